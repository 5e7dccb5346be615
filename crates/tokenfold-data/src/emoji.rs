//! Emoji images with names: an `emoji-datasource-<style>` package joined with `emojibase-data` labels.
//!
//! The join key is the code-point sequence with variation selectors (U+FE0F) removed, because the two
//! packages disagree on where they write them (`00A9-FE0F` against `00A9`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbaImage;
use serde::Deserialize;

use crate::error::{DataError, Result, read_json};

/// One emoji: the datasource record joined with its CLDR label.
#[derive(Debug, Clone, PartialEq)]
pub struct Emoji {
    /// Code points, upper-case hex joined by '-', as in the datasource (`1F98A`).
    pub unified: String,
    /// Unicode name, lower-cased (`fox face`).
    pub name: String,
    pub short_name: String,
    pub category: String,
    pub subcategory: String,
    pub sort_order: u32,
    /// CLDR label from emojibase (`fox`); `None` when emojibase has no record for this code point.
    pub label: Option<String>,
    pub tags: Vec<String>,
    /// Image file name inside the style's 64 px folder.
    pub image: String,
}

#[derive(Deserialize)]
struct DatasourceRecord {
    name: Option<String>,
    unified: String,
    image: String,
    short_name: String,
    category: String,
    subcategory: String,
    sort_order: u32,
}

#[derive(Deserialize)]
struct EmojibaseRecord {
    label: String,
    hexcode: String,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
struct PackageJson {
    name: String,
}

/// All emoji of one style, with labels, and the folder their 64 px images live in.
#[derive(Debug, Clone)]
pub struct EmojiSet {
    pub style: String,
    pub emoji: Vec<Emoji>,
    pub image_dir: PathBuf,
}

/// The join key: upper-case code points without variation selectors.
pub fn join_key(hexcode: &str) -> String {
    hexcode
        .split('-')
        .filter(|part| !part.eq_ignore_ascii_case("FE0F"))
        .map(|part| part.to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join("-")
}

impl EmojiSet {
    /// Loads `<datasource_root>/emoji.json` and the labels of `<emojibase_root>/en/data.json`.
    ///
    /// `datasource_root` is the root of any `emoji-datasource-<style>` package; the style is read from its
    /// `package.json`, and records whose `has_img_<style>` is false are skipped.
    pub fn load(datasource_root: &Path, emojibase_root: &Path) -> Result<EmojiSet> {
        let package_path = datasource_root.join("package.json");
        if !package_path.exists() {
            return Err(DataError::MissingData {
                path: datasource_root.to_path_buf(),
                what: "package.json of an emoji-datasource-<style> package".into(),
            });
        }
        let package: PackageJson = read_json(&package_path)?;
        let style = package
            .name
            .strip_prefix("emoji-datasource-")
            .ok_or_else(|| DataError::Record {
                path: package_path.clone(),
                index: 0,
                message: format!(
                    "package name '{}' is not emoji-datasource-<style>",
                    package.name
                ),
            })?
            .to_string();
        let labels = load_emojibase(&emojibase_root.join("en").join("data.json"))?;
        let records_path = datasource_root.join("emoji.json");
        let emoji = load_datasource(&records_path, &style, &labels)?;
        Ok(EmojiSet {
            image_dir: datasource_root.join("img").join(&style).join("64"),
            style,
            emoji,
        })
    }

    pub fn image_path(&self, emoji: &Emoji) -> PathBuf {
        self.image_dir.join(&emoji.image)
    }

    /// Decodes one emoji's 64 px RGBA image.
    pub fn load_image(&self, emoji: &Emoji) -> Result<RgbaImage> {
        load_rgba(&self.image_path(emoji))
    }

    pub fn labelled(&self) -> impl Iterator<Item = &Emoji> {
        self.emoji.iter().filter(|e| e.label.is_some())
    }
}

/// Decodes a PNG file into RGBA, naming the file in the error.
pub fn load_rgba(path: &Path) -> Result<RgbaImage> {
    let bytes = crate::error::read_file(path)?;
    let decoded =
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).map_err(|e| {
            DataError::Image {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
    Ok(decoded.to_rgba8())
}

fn records(path: &Path) -> Result<Vec<serde_json::Value>> {
    if !path.exists() {
        return Err(DataError::MissingData {
            path: path.parent().unwrap_or(path).to_path_buf(),
            what: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        });
    }
    read_json(path)
}

fn parse_record<T: serde::de::DeserializeOwned>(
    path: &Path,
    index: usize,
    value: serde_json::Value,
) -> Result<T> {
    serde_json::from_value(value).map_err(|e| DataError::Record {
        path: path.to_path_buf(),
        index,
        message: e.to_string(),
    })
}

fn load_emojibase(path: &Path) -> Result<HashMap<String, EmojibaseRecord>> {
    let mut labels = HashMap::new();
    for (index, value) in records(path)?.into_iter().enumerate() {
        let record: EmojibaseRecord = parse_record(path, index, value)?;
        labels.entry(join_key(&record.hexcode)).or_insert(record);
    }
    Ok(labels)
}

fn load_datasource(
    path: &Path,
    style: &str,
    labels: &HashMap<String, EmojibaseRecord>,
) -> Result<Vec<Emoji>> {
    let has_image_field = format!("has_img_{style}");
    let mut emoji = Vec::new();
    for (index, value) in records(path)?.into_iter().enumerate() {
        let has_image = value.get(&has_image_field).and_then(|v| v.as_bool());
        let record: DatasourceRecord = parse_record(path, index, value)?;
        match has_image {
            Some(true) => {}
            Some(false) => continue,
            None => {
                return Err(DataError::Record {
                    path: path.to_path_buf(),
                    index,
                    message: format!("missing boolean field `{has_image_field}`"),
                });
            }
        }
        let joined = labels.get(&join_key(&record.unified));
        emoji.push(Emoji {
            name: record
                .name
                .unwrap_or_else(|| record.short_name.replace('_', " "))
                .to_lowercase(),
            unified: record.unified,
            short_name: record.short_name,
            category: record.category,
            subcategory: record.subcategory,
            sort_order: record.sort_order,
            label: joined.map(|r| r.label.clone()),
            tags: joined.map(|r| r.tags.clone()).unwrap_or_default(),
            image: record.image,
        });
    }
    emoji.sort_by_key(|e| e.sort_order);
    Ok(emoji)
}
