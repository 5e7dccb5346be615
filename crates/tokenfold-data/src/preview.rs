//! A PNG contact sheet of samples with their question and answer written under each, so that a person
//! can look at the data (`tokenfold data show`). Text is drawn with the public-domain 8×8 font of the
//! `font8x8` crate; characters outside ASCII are drawn as '?'.

use font8x8::legacy::BASIC_LEGACY;
use image::{Rgb, RgbImage};

use crate::tasks::Sample;

const GLYPH: u32 = 8;
const LINE: u32 = 10;
const MARGIN: u32 = 6;
const TEXT_LINES: u32 = 5;

/// Lays samples out `columns` to a row, each image scaled by `scale` (nearest neighbour).
pub fn contact_sheet(samples: &[Sample], columns: usize, scale: u32, canvas: u32) -> RgbImage {
    let columns = columns.clamp(1, samples.len().max(1)) as u32;
    let rows = (samples.len() as u32).div_ceil(columns).max(1);
    let side = canvas * scale;
    let (cell_w, cell_h) = (side + 2 * MARGIN, side + TEXT_LINES * LINE + 2 * MARGIN);
    let mut sheet = RgbImage::from_pixel(columns * cell_w, rows * cell_h, Rgb([255, 255, 255]));
    let chars_per_line = (side / GLYPH) as usize;
    for (i, sample) in samples.iter().enumerate() {
        let (x0, y0) = (
            (i as u32 % columns) * cell_w + MARGIN,
            (i as u32 / columns) * cell_h + MARGIN,
        );
        let text_y = match &sample.image {
            Some(image) => {
                for (x, y, pixel) in image.enumerate_pixels() {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            sheet.put_pixel(x0 + x * scale + dx, y0 + y * scale + dy, *pixel);
                        }
                    }
                }
                y0 + side + 2
            }
            None => y0,
        };
        let mut lines = Vec::new();
        if sample.image.is_some() {
            lines.extend(wrap(
                &format!("{}: {}", sample.task, sample.question),
                chars_per_line,
            ));
            lines.extend(wrap(&format!("A: {}", sample.answer), chars_per_line));
            lines.truncate(TEXT_LINES as usize);
        } else {
            lines.extend(wrap(
                &format!("{}: {}", sample.task, sample.answer),
                chars_per_line,
            ));
            lines.truncate(((side + TEXT_LINES * LINE) / LINE) as usize);
        }
        for (row, line) in lines.iter().enumerate() {
            draw_text(&mut sheet, x0, text_y + row as u32 * LINE, line);
        }
    }
    sheet
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
        while line.chars().count() > width {
            let rest: String = line.chars().skip(width).collect();
            lines.push(line.chars().take(width).collect());
            line = rest;
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

fn draw_text(sheet: &mut RgbImage, x0: u32, y0: u32, text: &str) {
    for (i, ch) in text.chars().enumerate() {
        let code = if ch.is_ascii() {
            ch as usize
        } else {
            '?' as usize
        };
        for (row, bits) in BASIC_LEGACY[code].iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let (x, y) = (x0 + i as u32 * GLYPH + col, y0 + row as u32);
                    if x < sheet.width() && y < sheet.height() {
                        sheet.put_pixel(x, y, Rgb([0, 0, 0]));
                    }
                }
            }
        }
    }
}

/// Encodes an image as PNG and writes it atomically.
pub fn save_png(image: &RgbImage, path: &std::path::Path) -> crate::Result<()> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| crate::DataError::Image {
            path: path.to_path_buf(),
            message: format!("cannot encode PNG: {e}"),
        })?;
    crate::write_atomic(path, &bytes)
}
