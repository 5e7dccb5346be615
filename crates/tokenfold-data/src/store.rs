//! Where the data lives and what is there: the folder `scripts/fetch-data.sh` fills, the loading of every
//! asset, and the counts `tokenfold data stats` prints.

use std::path::{Path, PathBuf};

use crate::digits::Digits;
use crate::emoji::EmojiSet;
use crate::error::{DataError, Result};
use crate::scene::{SceneConfig, Sprites};
use crate::speeches::Speeches;
use crate::tasks::Assets;
use crate::vocab::Vocabulary;

/// Bytes of speech in one `text` sample.
pub const TEXT_SAMPLE_BYTES: usize = 1200;

/// The data folder and the package folders inside it.
#[derive(Debug, Clone, PartialEq)]
pub struct DataPaths {
    pub root: PathBuf,
    /// Emoji style: the folder `emoji-datasource-<style>` holds the images.
    pub emoji_style: String,
}

impl DataPaths {
    /// `root`, else `$TOKENFOLD_DATA`, else `./data`; the Google emoji style.
    pub fn resolve(root: Option<&Path>) -> DataPaths {
        let root = root
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("TOKENFOLD_DATA").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("data"));
        DataPaths {
            root,
            emoji_style: "google".into(),
        }
    }

    pub fn emoji_datasource(&self) -> PathBuf {
        self.root
            .join(format!("emoji-datasource-{}", self.emoji_style))
    }

    pub fn emojibase(&self) -> PathBuf {
        self.root.join("emojibase-data")
    }

    pub fn mnist(&self) -> PathBuf {
        self.root.join("mnist")
    }

    pub fn sotu(&self) -> PathBuf {
        self.root.join("sotu")
    }

    /// The default tokenizer file, made by `tokenfold data tokenizer`.
    pub fn tokenizer(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }

    /// Fails with a message naming what is missing and how to fetch it.
    pub fn check(&self) -> Result<()> {
        if !self.root.is_dir() {
            return Err(DataError::MissingData {
                path: self.root.clone(),
                what: "datasets (the folder does not exist)".into(),
            });
        }
        for (path, package) in [
            (
                self.emoji_datasource(),
                format!("emoji-datasource-{}", self.emoji_style),
            ),
            (self.emojibase(), "emojibase-data".into()),
            (self.mnist(), "mnist".into()),
            (self.sotu(), "sotu".into()),
        ] {
            if !path.is_dir() {
                return Err(DataError::MissingData {
                    path: self.root.clone(),
                    what: format!("{package}/ package folder"),
                });
            }
        }
        Ok(())
    }
}

/// What is installed, and how much.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DataStats {
    pub root: PathBuf,
    pub emoji_style: String,
    pub emoji: usize,
    pub emoji_with_label: usize,
    pub emoji_images_present: usize,
    pub digits: usize,
    pub digits_per_class: [usize; 10],
    pub speeches: usize,
    pub speech_bytes: usize,
    pub speech_words: usize,
    pub first_year: u32,
    pub last_year: u32,
    pub vocabulary: usize,
    pub kinds: Vec<&'static str>,
}

pub fn stats(paths: &DataPaths) -> Result<DataStats> {
    paths.check()?;
    let emoji = EmojiSet::load(&paths.emoji_datasource(), &paths.emojibase())?;
    let digits = Digits::load(&paths.mnist())?;
    let speeches = Speeches::load(&paths.sotu())?;
    let vocab = Vocabulary::from_emoji(&emoji)?;
    Ok(DataStats {
        root: paths.root.clone(),
        emoji_style: emoji.style.clone(),
        emoji: emoji.emoji.len(),
        emoji_with_label: emoji.labelled().count(),
        emoji_images_present: emoji
            .emoji
            .iter()
            .filter(|e| emoji.image_path(e).is_file())
            .count(),
        digits: digits.len(),
        digits_per_class: std::array::from_fn(|d| digits.by_digit[d].len()),
        speeches: speeches.speeches.len(),
        speech_bytes: speeches.total_bytes(),
        speech_words: speeches
            .speeches
            .iter()
            .map(|s| s.text.split_whitespace().count())
            .sum(),
        first_year: speeches.speeches.iter().map(|s| s.year).min().unwrap_or(0),
        last_year: speeches.speeches.iter().map(|s| s.year).max().unwrap_or(0),
        vocabulary: vocab.len(),
        kinds: vocab.kinds(),
    })
}

/// Loads everything scene and text generation needs.
pub fn load_assets(paths: &DataPaths, scene: SceneConfig) -> Result<Assets> {
    scene.validate()?;
    paths.check()?;
    let emoji = EmojiSet::load(&paths.emoji_datasource(), &paths.emojibase())?;
    let vocab = Vocabulary::from_emoji(&emoji)?;
    let images = vocab
        .objects
        .iter()
        .map(|o| emoji.load_image(&emoji.emoji[o.emoji_index]))
        .collect::<Result<Vec<_>>>()?;
    Ok(Assets {
        sprites: Sprites::new(&images, &scene),
        scene,
        vocab,
        digits: Digits::load(&paths.mnist())?,
        speeches: Speeches::load(&paths.sotu())?,
        text_bytes: TEXT_SAMPLE_BYTES,
    })
}
