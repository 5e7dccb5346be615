//! A tiny generated data folder in the layout `scripts/fetch-data.sh` produces, for unit tests here and in
//! the crates built on this one: no test needs the real data.
//!
//! It holds 3 emoji per vocabulary subcategory (coloured shapes, 64 px) plus records that the vocabulary
//! rule must reject (a face, a repeated head noun, a non-ASCII label, a flag), one emoji without an image
//! in this style and one without an emojibase label; 12 synthetic digits per class; and 20 short speeches
//! with non-ASCII punctuation.

use std::path::Path;

use image::{Rgba, RgbaImage};
use serde_json::{Value, json};

use crate::error::{DataError, Result};
use crate::store::DataPaths;
use crate::vocab::KINDS;

pub const DIGITS_PER_CLASS: usize = 12;
pub const SPEECHES: usize = 20;

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    write(path, value.to_string().as_bytes())
}

/// A 64 × 64 RGBA emoji stand-in: a shape (disc, square or diamond) in a colour given by `index`.
pub fn emoji_image(index: usize) -> RgbaImage {
    let colour = [
        (index * 67 % 200 + 40) as u8,
        (index * 131 % 200 + 40) as u8,
        (index * 29 % 200 + 40) as u8,
    ];
    RgbaImage::from_fn(64, 64, |x, y| {
        let (dx, dy) = (x as i32 - 32, y as i32 - 32);
        let inside = match index % 3 {
            0 => dx * dx + dy * dy <= 26 * 26,
            1 => dx.abs() <= 22 && dy.abs() <= 22,
            _ => dx.abs() + dy.abs() <= 28,
        };
        let stripe = (x / 8 + y / 8 + index as u32).is_multiple_of(2);
        if inside {
            let shade = if stripe { 0 } else { 40 };
            Rgba([
                colour[0].saturating_sub(shade),
                colour[1],
                colour[2].saturating_sub(shade),
                255,
            ])
        } else {
            Rgba([0, 0, 0, 0])
        }
    })
}

/// Writes the fixture into `root` and returns its paths.
pub fn write_fixture(root: &Path) -> Result<DataPaths> {
    let paths = DataPaths {
        root: root.to_path_buf(),
        emoji_style: "fixture".into(),
    };
    let datasource = paths.emoji_datasource();
    write_json(
        &datasource.join("package.json"),
        &json!({"name": "emoji-datasource-fixture", "version": "0.0.0"}),
    )?;
    let mut records = Vec::new();
    let mut labels = Vec::new();
    let mut add = |unified: String, label: Option<&str>, subcategory: &str, has_image: bool| {
        let index = records.len();
        let image = format!("{}.png", unified.to_lowercase());
        records.push(json!({
            "name": label.map(|l| l.to_uppercase()),
            "unified": unified,
            "image": image,
            "short_name": format!("emoji_{index}"),
            "category": "Fixture",
            "subcategory": subcategory,
            "sort_order": index,
            "has_img_fixture": has_image,
        }));
        if let Some(label) = label {
            // Written with a variation selector, as emojibase does for some emoji: the join must ignore it.
            let hexcode = if index % 5 == 0 {
                format!("{unified}-FE0F")
            } else {
                unified.clone()
            };
            labels.push(
                json!({"label": label, "hexcode": hexcode, "tags": ["fixture", subcategory]}),
            );
        }
        (index, image)
    };
    let mut images = Vec::new();
    for (s, (subcategory, _)) in KINDS.iter().enumerate() {
        for k in 0..3 {
            let label = format!("{} {}", ["red", "blue", "green"][k], fixture_noun(s, k));
            images.push(add(
                format!("1F{:03X}", s * 8 + k),
                Some(&label),
                subcategory,
                true,
            ));
        }
    }
    // Records the vocabulary rule rejects, and edge cases of the loader.
    images.push(add("1F300".into(), Some("cat face"), "animal-mammal", true));
    images.push(add(
        "1F301".into(),
        Some("guide ant0"),
        "animal-mammal",
        true,
    )); // head noun of "red ant0"
    images.push(add(
        "1F302".into(),
        Some("woman\u{2019}s hat"),
        "clothing",
        true,
    ));
    images.push(add("1F303".into(), Some("flag"), "country-flag", true));
    images.push(add("1F304".into(), None, "animal-bug", true));
    add("1F305".into(), Some("missing image"), "animal-bug", false);
    write_json(&datasource.join("emoji.json"), &Value::Array(records))?;
    write_json(
        &paths.emojibase().join("en").join("data.json"),
        &Value::Array(labels),
    )?;
    for (index, name) in images {
        let path = datasource.join("img").join("fixture").join("64").join(name);
        let mut bytes = Vec::new();
        emoji_image(index)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .map_err(|e| DataError::Image {
                path: path.clone(),
                message: e.to_string(),
            })?;
        write(&path, &bytes)?;
    }

    for digit in 0..10 {
        let data: Vec<f32> = (0..DIGITS_PER_CLASS)
            .flat_map(|i| digit_image(digit, i))
            .collect();
        write_json(
            &paths
                .mnist()
                .join("src")
                .join("digits")
                .join(format!("{digit}.json")),
            &json!({"data": data}),
        )?;
    }

    for i in 0..SPEECHES {
        let text = format!(
            "Fellow citizens of speech {i}: the state of the union is strong \u{2014} we met {i} challenges, \
             and the harvest was good. Congress shall consider the budget, the army, the navy and the \
             treasury once more. Our nation\u{2019}s people worked hard in year {}. ",
            1790 + i
        )
        .repeat(3);
        write(
            &paths
                .sotu()
                .join("data")
                .join(format!("{}_george_washington_n.txt", 1790 + i)),
            text.as_bytes(),
        )?;
    }
    Ok(paths)
}

fn fixture_noun(subcategory: usize, k: usize) -> String {
    const NOUNS: [&str; 8] = ["ant", "bee", "cup", "hat", "kite", "drum", "boat", "pear"];
    format!("{}{}", NOUNS[(subcategory + k) % NOUNS.len()], subcategory)
}

/// A synthetic 28 × 28 digit: a bar whose position and width depend on the digit and the sample.
fn digit_image(digit: usize, sample: usize) -> Vec<f32> {
    (0..28 * 28)
        .map(|p| {
            let (x, y) = (p % 28, p / 28);
            let left = 4 + digit + sample % 3;
            if (6..22).contains(&y) && (left..left + 3 + digit % 4).contains(&x) {
                0.9
            } else {
                0.0
            }
        })
        .collect()
}

/// Writes to `path` a copy of `tokenizer` of the kind tokenfold trained before digits were split: byte-level
/// pre-tokenization only, plus a merge of "4" and "7" into one token, so that tests can check how such a
/// tokenizer is recognised and replaced.
pub fn write_digit_merging_tokenizer(
    tokenizer: &crate::tokenizer::TextTokenizer,
    path: &Path,
) -> Result<()> {
    let text = tokenizer
        .inner
        .to_string(false)
        .map_err(|e| DataError::Tokenizer(format!("cannot serialise: {e}")))?;
    let mut json: Value = serde_json::from_str(&text)
        .map_err(|e| DataError::Tokenizer(format!("cannot parse its own JSON: {e}")))?;
    json["pre_tokenizer"] = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    json["model"]["vocab"]["47"] = json!(tokenizer.vocab_size());
    json["model"]["merges"]
        .as_array_mut()
        .ok_or_else(|| DataError::Tokenizer("a BPE tokenizer without merges".into()))?
        .push(json!(["4", "7"]));
    crate::write_atomic(path, json.to_string().as_bytes())
}
