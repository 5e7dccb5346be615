//! Scene rendering: real emoji and MNIST digits composed on a cluttered background.
//!
//! A [`Scene`] is a pure description (which object in which grid cell, at which size and offset; which
//! handwritten digits on a plate; a background seed); [`render`] turns it into an RGB canvas. Everything
//! after the one-off sprite resize at load time is integer arithmetic, so the same scene gives the same
//! bytes on every machine.

use image::imageops::FilterType;
use image::{GrayImage, ImageBuffer, Rgb, RgbImage, Rgba, RgbaImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::digits::{DIGIT_SIDE, DigitImage, Digits};
use crate::error::{DataError, Result};

/// Geometry of the benchmark scenes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SceneConfig {
    /// Side of the square RGB canvas, pixels.
    pub canvas: u32,
    /// The canvas is a grid × grid layout of cells; objects sit on cell centres (jittered).
    pub grid: u32,
    pub min_objects: usize,
    pub max_objects: usize,
    /// Object side range in scenes, pixels.
    pub min_size: u32,
    pub max_size: u32,
    /// Largest offset of an object from its cell centre, pixels.
    pub jitter: u32,
    /// Object side range of the single-emoji caption task, pixels.
    pub caption_min_size: u32,
    pub caption_max_size: u32,
    /// Height of a handwritten digit on a number plate, pixels.
    pub digit_height: u32,
}

impl Default for SceneConfig {
    fn default() -> Self {
        SceneConfig {
            canvas: 64,
            grid: 3,
            min_objects: 1,
            max_objects: 6,
            min_size: 12,
            max_size: 20,
            jitter: 2,
            caption_min_size: 20,
            caption_max_size: 32,
            digit_height: 12,
        }
    }
}

impl SceneConfig {
    pub fn validate(&self) -> Result<()> {
        let fail = |field: &str, message: String| Err(DataError::config(field, message));
        if !(16..=1024).contains(&self.canvas) {
            return fail(
                "scene.canvas",
                format!("{} is outside 16..=1024", self.canvas),
            );
        }
        if !(2..=8).contains(&self.grid) {
            return fail("scene.grid", format!("{} is outside 2..=8", self.grid));
        }
        let cells = (self.grid * self.grid) as usize;
        // Count answers go up to 4, so a scene must hold at least 4 objects.
        if self.min_objects == 0
            || self.min_objects > self.max_objects
            || !(4..=cells - 2).contains(&self.max_objects)
        {
            return fail(
                "scene.min_objects/max_objects",
                format!(
                    "need 1 <= min_objects ({}) <= max_objects ({}) and 4 <= max_objects <= cells - 2 ({})",
                    self.min_objects,
                    self.max_objects,
                    cells - 2
                ),
            );
        }
        if self.min_size < 4 || self.min_size > self.max_size || self.max_size > self.canvas {
            return fail(
                "scene.min_size/max_size",
                format!(
                    "need 4 <= min_size ({}) <= max_size ({}) <= canvas ({})",
                    self.min_size, self.max_size, self.canvas
                ),
            );
        }
        if self.caption_min_size < 4
            || self.caption_min_size > self.caption_max_size
            || self.caption_max_size > self.canvas
        {
            return fail(
                "scene.caption_min_size/caption_max_size",
                format!(
                    "need 4 <= caption_min_size ({}) <= caption_max_size ({}) <= canvas ({})",
                    self.caption_min_size, self.caption_max_size, self.canvas
                ),
            );
        }
        if !(6..=DIGIT_SIDE as u32).contains(&self.digit_height)
            || self.digit_height > self.canvas / 2
        {
            return fail(
                "scene.digit_height",
                format!(
                    "{} is outside 6..=28 or above half the canvas",
                    self.digit_height
                ),
            );
        }
        Ok(())
    }

    pub fn cells(&self) -> usize {
        (self.grid * self.grid) as usize
    }

    /// Pixel bounds `[x0, x1)` of column (or row) `index`.
    fn cell_span(&self, index: u32) -> (u32, u32) {
        (
            index * self.canvas / self.grid,
            (index + 1) * self.canvas / self.grid,
        )
    }

    /// Sprite sides the renderer needs, smallest first.
    fn sprite_sizes(&self) -> std::ops::RangeInclusive<u32> {
        self.min_size.min(self.caption_min_size)..=self.max_size.max(self.caption_max_size)
    }
}

/// Names of the cells of a 3 × 3 grid (row-major); other grids use "row r, column c".
pub fn cell_name(grid: u32, cell: usize) -> String {
    const NAMES: [&str; 9] = [
        "top left",
        "top middle",
        "top right",
        "middle left",
        "center",
        "middle right",
        "bottom left",
        "bottom middle",
        "bottom right",
    ];
    if grid == 3 {
        NAMES[cell].to_string()
    } else {
        format!(
            "row {}, column {}",
            cell / grid as usize + 1,
            cell % grid as usize + 1
        )
    }
}

/// One object placed in a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Placed {
    pub object: usize,
    /// Grid cell, row-major; `usize::MAX` for free placement (caption task).
    pub cell: usize,
    /// Top-left corner and side, pixels.
    pub x: u32,
    pub y: u32,
    pub size: u32,
}

/// A number written with real handwritten digits on a plate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NumberPlate {
    /// (digit, index into `Digits::by_digit[digit]`), left to right.
    pub digits: Vec<(u8, usize)>,
    /// Centre of the plate, pixels.
    pub cx: u32,
    pub cy: u32,
    /// Cells the plate covers (kept free of objects).
    pub cells: Vec<usize>,
    pub dark_on_light: bool,
}

impl NumberPlate {
    pub fn text(&self) -> String {
        self.digits
            .iter()
            .map(|(d, _)| char::from(b'0' + d))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scene {
    pub background_seed: u64,
    pub objects: Vec<Placed>,
    pub number: Option<NumberPlate>,
}

impl Scene {
    /// Places `object` in `cell` with side `size`, jittered around the cell centre and kept on the canvas.
    pub fn place(
        cfg: &SceneConfig,
        rng: &mut impl Rng,
        object: usize,
        cell: usize,
        size: u32,
    ) -> Placed {
        let (row, col) = (cell as u32 / cfg.grid, cell as u32 % cfg.grid);
        let (x0, x1) = cfg.cell_span(col);
        let (y0, y1) = cfg.cell_span(row);
        let jitter = cfg.jitter as i64;
        let mut offset = || rng.random_range(-jitter..=jitter);
        let x = ((x0 + x1) as i64 / 2 - size as i64 / 2 + offset())
            .clamp(0, (cfg.canvas - size) as i64);
        let y = ((y0 + y1) as i64 / 2 - size as i64 / 2 + offset())
            .clamp(0, (cfg.canvas - size) as i64);
        Placed {
            object,
            cell,
            x: x as u32,
            y: y as u32,
            size,
        }
    }

    /// A plate spanning `cells` (adjacent cells of one row), centred on them.
    pub fn plate(
        cfg: &SceneConfig,
        rng: &mut impl Rng,
        digits: Vec<(u8, usize)>,
        cells: Vec<usize>,
    ) -> NumberPlate {
        let (first, last) = (cells[0] as u32, *cells.last().unwrap_or(&cells[0]) as u32);
        let row = first / cfg.grid;
        let (x0, _) = cfg.cell_span(first % cfg.grid);
        let (_, x1) = cfg.cell_span(last % cfg.grid);
        let (y0, y1) = cfg.cell_span(row);
        let jitter = cfg.jitter as i64;
        let cx = ((x0 + x1) as i64 / 2 + rng.random_range(-jitter..=jitter)) as u32;
        let cy = ((y0 + y1) as i64 / 2 + rng.random_range(-jitter..=jitter)) as u32;
        NumberPlate {
            digits,
            cx,
            cy,
            cells,
            dark_on_light: rng.random_bool(0.5),
        }
    }
}

/// Object images at every side the renderer uses, premultiplied RGBA, resized once at load.
#[derive(Debug, Clone)]
pub struct Sprites {
    min_side: u32,
    /// `by_object[object][side - min_side]`: side × side premultiplied RGBA pixels.
    by_object: Vec<Vec<Vec<[u8; 4]>>>,
}

impl Sprites {
    pub fn new(images: &[RgbaImage], cfg: &SceneConfig) -> Sprites {
        let sizes = cfg.sprite_sizes();
        let by_object = images
            .iter()
            .map(|image| {
                let premultiplied = premultiply(image);
                sizes
                    .clone()
                    .map(|side| {
                        let resized = image::imageops::resize(
                            &premultiplied,
                            side,
                            side,
                            FilterType::Triangle,
                        );
                        resized
                            .pixels()
                            .map(|p| p.0.map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        Sprites {
            min_side: *sizes.start(),
            by_object,
        }
    }

    pub fn len(&self) -> usize {
        self.by_object.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_object.is_empty()
    }

    fn get(&self, object: usize, side: u32) -> &[[u8; 4]] {
        &self.by_object[object][(side - self.min_side) as usize]
    }
}

fn premultiply(image: &RgbaImage) -> ImageBuffer<Rgba<f32>, Vec<f32>> {
    ImageBuffer::from_fn(image.width(), image.height(), |x, y| {
        let [r, g, b, a] = image.get_pixel(x, y).0.map(|v| v as f32 / 255.0);
        Rgba([r * a, g * a, b * a, a])
    })
}

/// Draws a scene.
pub fn render(scene: &Scene, cfg: &SceneConfig, sprites: &Sprites, digits: &Digits) -> RgbImage {
    let mut canvas = RgbImage::new(cfg.canvas, cfg.canvas);
    draw_background(&mut canvas, scene.background_seed);
    for placed in &scene.objects {
        blit(
            &mut canvas,
            sprites.get(placed.object, placed.size),
            placed.x,
            placed.y,
            placed.size,
        );
    }
    if let Some(plate) = &scene.number {
        draw_plate(&mut canvas, plate, cfg, digits);
    }
    canvas
}

/// A gradient between two random colours, 4–10 translucent shapes, and per-pixel noise: clutter that makes
/// background patches differ, so that dropping them is not trivially free.
fn draw_background(canvas: &mut RgbImage, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let side = canvas.width() as i64;
    let colour = |rng: &mut ChaCha8Rng| [0; 3].map(|_: u8| rng.random_range(40..=215u8));
    let (from, to) = (colour(&mut rng), colour(&mut rng));
    let direction = rng.random_range(0..3u8);
    for (x, y, pixel) in canvas.enumerate_pixels_mut() {
        let (x, y) = (x as i64, y as i64);
        let (t, span) = match direction {
            0 => (x, side - 1),
            1 => (y, side - 1),
            _ => (x + y, 2 * (side - 1)),
        };
        *pixel = Rgb(std::array::from_fn(|c| {
            (from[c] as i64 + (to[c] as i64 - from[c] as i64) * t / span) as u8
        }));
    }
    for _ in 0..rng.random_range(4..=10) {
        let fill = colour(&mut rng);
        let alpha = rng.random_range(60..=150u32);
        let (cx, cy) = (rng.random_range(0..side), rng.random_range(0..side));
        let shape = rng.random_range(0..3u8);
        let (w, h) = (
            rng.random_range(4..=side / 2),
            rng.random_range(4..=side / 2),
        );
        let thickness = rng.random_range(1..=3i64);
        let inside = |x: i64, y: i64| match shape {
            0 => (x - cx).abs() * 2 <= w && (y - cy).abs() * 2 <= h,
            // ellipse with semi-axes w/2, h/2: (dx/(w/2))² + (dy/(h/2))² <= 1, in integers
            1 => 4 * (x - cx).pow(2) * h * h + 4 * (y - cy).pow(2) * w * w <= w * w * h * h,
            // a stripe through (cx, cy) with slope h/w
            _ => ((y - cy) * w - (x - cx) * h).abs() <= thickness * (w + h) / 2,
        };
        for (x, y, pixel) in canvas.enumerate_pixels_mut() {
            if inside(x as i64, y as i64) {
                for (channel, &f) in pixel.0.iter_mut().zip(&fill) {
                    *channel =
                        ((*channel as u32 * (255 - alpha) + f as u32 * alpha + 127) / 255) as u8;
                }
            }
        }
    }
    for pixel in canvas.pixels_mut() {
        let noise = rng.random::<u32>();
        for c in 0..3 {
            let delta = ((noise >> (8 * c)) & 0xff) as i32 % 21 - 10;
            pixel.0[c] = (pixel.0[c] as i32 + delta).clamp(0, 255) as u8;
        }
    }
}

/// Composites a premultiplied sprite: out = src + dst × (1 − α).
fn blit(canvas: &mut RgbImage, sprite: &[[u8; 4]], x0: u32, y0: u32, side: u32) {
    for sy in 0..side {
        for sx in 0..side {
            let (x, y) = (x0 + sx, y0 + sy);
            if x >= canvas.width() || y >= canvas.height() {
                continue;
            }
            let [r, g, b, a] = sprite[(sy * side + sx) as usize];
            if a == 0 {
                continue;
            }
            let pixel = canvas.get_pixel_mut(x, y);
            for (c, src) in [r, g, b].into_iter().enumerate() {
                let blended = src as u32 + (pixel.0[c] as u32 * (255 - a as u32) + 127) / 255;
                pixel.0[c] = blended.min(255) as u8;
            }
        }
    }
}

/// A handwritten digit cropped to its ink and scaled to `height` pixels (width kept in proportion).
fn digit_glyph(image: &DigitImage, height: u32) -> GrayImage {
    let ink = |x: usize, y: usize| image[y * DIGIT_SIDE + x] > 30;
    let rows: Vec<usize> = (0..DIGIT_SIDE)
        .filter(|&y| (0..DIGIT_SIDE).any(|x| ink(x, y)))
        .collect();
    let cols: Vec<usize> = (0..DIGIT_SIDE)
        .filter(|&x| (0..DIGIT_SIDE).any(|y| ink(x, y)))
        .collect();
    let (Some(&y0), Some(&y1), Some(&x0), Some(&x1)) =
        (rows.first(), rows.last(), cols.first(), cols.last())
    else {
        return GrayImage::new(height / 2, height);
    };
    let (w, h) = ((x1 - x0 + 1) as u32, (y1 - y0 + 1) as u32);
    let cropped = GrayImage::from_fn(w, h, |x, y| {
        image::Luma([image[(y0 + y as usize) * DIGIT_SIDE + x0 + x as usize]])
    });
    let width = ((w * height + h / 2) / h).max(2);
    image::imageops::resize(&cropped, width, height, FilterType::Triangle)
}

fn draw_plate(canvas: &mut RgbImage, plate: &NumberPlate, cfg: &SceneConfig, digits: &Digits) {
    const PAD: u32 = 2;
    const GAP: u32 = 1;
    let glyphs: Vec<GrayImage> = plate
        .digits
        .iter()
        .map(|&(d, i)| digit_glyph(&digits.by_digit[d as usize][i], cfg.digit_height))
        .collect();
    let text_width: u32 =
        glyphs.iter().map(|g| g.width()).sum::<u32>() + GAP * (glyphs.len() as u32 - 1);
    let (w, h) = (text_width + 2 * PAD, cfg.digit_height + 2 * PAD);
    let x0 = plate
        .cx
        .saturating_sub(w / 2)
        .min(cfg.canvas.saturating_sub(w));
    let y0 = plate
        .cy
        .saturating_sub(h / 2)
        .min(cfg.canvas.saturating_sub(h));
    let (paper, ink) = if plate.dark_on_light {
        ([235u8, 232, 220], [20u8, 20, 40])
    } else {
        ([30u8, 34, 40], [245u8, 245, 235])
    };
    for y in y0..(y0 + h).min(cfg.canvas) {
        for x in x0..(x0 + w).min(cfg.canvas) {
            canvas.put_pixel(x, y, Rgb(paper));
        }
    }
    let mut x = x0 + PAD;
    for glyph in &glyphs {
        for (gx, gy, value) in glyph.enumerate_pixels() {
            let (px, py) = (x + gx, y0 + PAD + gy);
            if px >= cfg.canvas || py >= cfg.canvas {
                continue;
            }
            let a = value.0[0] as u32;
            let pixel = canvas.get_pixel_mut(px, py);
            for (channel, (&p, &i)) in pixel.0.iter_mut().zip(paper.iter().zip(&ink)) {
                *channel = ((p as u32 * (255 - a) + i as u32 * a + 127) / 255) as u8;
            }
        }
        x += glyph.width() + GAP;
    }
}
