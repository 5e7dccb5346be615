//! Line charts as SVG and PNG (plotters): one series per method or architecture, markers at the points.
//!
//! Both backends lay text out with a TrueType font: the first of [`FONT_PATHS`] that exists is used, and a
//! machine without any gets a clear error naming them (the tables beside the plots are written first).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Where Debian, Fedora, Arch and macOS keep a sans-serif TrueType font.
pub const FONT_PATHS: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
];

/// One named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Join the points with a line (otherwise markers only).
    pub line: bool,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
}

const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let points = chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        bail!("nothing to plot");
    }
    let pad_y = ((y1 - y0) * 0.08).max(1e-3);
    let (y0, y1) = (y0 - pad_y, y1 + pad_y);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56);
    let style = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e}");
    let pad_x = ((x1 - x0) * 0.05).max(1e-3);
    let (x0, x1) = (x0 - pad_x, x1 + pad_x);
    let (corner, x1) = legend_placement(
        chart.series.iter().flat_map(|s| s.points.iter().copied()),
        ((x0, x1), (y0, y1)),
        chart.series.len(),
    );
    let mut ctx = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(style)?;
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .draw()
        .map_err(style)?;
    for (i, s) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line = if s.line { s.points.clone() } else { Vec::new() };
        ctx.draw_series(LineSeries::new(line, colour.stroke_width(2)))
            .map_err(style)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
        ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
            .map_err(style)?;
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(corner)
        .draw()
        .map_err(style)?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Legend box as a fraction of the plotting area: 40% of the width, and one line (6% of the height)
/// per series.
const LEGEND_WIDTH: f64 = 0.4;

fn legend_height(series: usize) -> f64 {
    (0.06 * series as f64 + 0.04).min(0.9)
}

/// The corner whose legend box would cover the fewest points; ties go to the lower right, then the
/// upper right.
fn quietest_corner(
    points: impl Iterator<Item = (f64, f64)>,
    ((x0, x1), (y0, y1)): ((f64, f64), (f64, f64)),
    series: usize,
) -> (SeriesLabelPosition, usize) {
    let (w, h) = (LEGEND_WIDTH, legend_height(series));
    let mut counts = [0usize; 4];
    for (x, y) in points {
        let (fx, fy) = ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
        let (right, left, top, bottom) = (fx >= 1.0 - w, fx <= w, fy >= 1.0 - h, fy <= h);
        for (i, covered) in [right && bottom, right && top, left && bottom, left && top]
            .into_iter()
            .enumerate()
        {
            counts[i] += covered as usize;
        }
    }
    let best = (0..4).min_by_key(|&i| (counts[i], i)).unwrap_or(0);
    let corner = [
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::LowerLeft,
        SeriesLabelPosition::UpperLeft,
    ][best]
        .clone();
    (corner, counts[best])
}

/// Where the legend goes, and the right end of the x axis: when every corner would hide points (a
/// legend of many series), the axis is extended so that the data fill the left 60% and the legend
/// takes the empty right side.
fn legend_placement(
    points: impl Iterator<Item = (f64, f64)>,
    ((x0, x1), (y0, y1)): ((f64, f64), (f64, f64)),
    series: usize,
) -> (SeriesLabelPosition, f64) {
    match quietest_corner(points, ((x0, x1), (y0, y1)), series) {
        (corner, 0) => (corner, x1),
        _ => (
            SeriesLabelPosition::UpperRight,
            x0 + (x1 - x0) / (1.0 - LEGEND_WIDTH),
        ),
    }
}

fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = FONT_PATHS
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    format!(
                        "plots need a TrueType font and none was found at {} (install fonts-dejavu-core)",
                        FONT_PATHS.join(", ")
                    )
                })?;
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Writes `<stem>.svg` and `<stem>.png`, each drawn into a temporary file and renamed into place.
pub fn save(chart: &Chart, stem: &Path) -> Result<(PathBuf, PathBuf)> {
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    let tmp = |path: &Path| {
        path.with_file_name(format!(
            ".tmp-{}",
            path.file_name()
                .map_or("plot".into(), |n| n.to_string_lossy())
        ))
    };
    let (svg_tmp, png_tmp) = (tmp(&svg), tmp(&png));
    // Both backends lay text out with the registered font.
    register_font()?;
    draw(
        SVGBackend::new(&svg_tmp, (900, 600)).into_drawing_area(),
        chart,
    )
    .with_context(|| format!("cannot draw {}", svg.display()))?;
    std::fs::rename(&svg_tmp, &svg).with_context(|| format!("cannot write {}", svg.display()))?;
    // Drawn into a buffer and encoded by the image crate tokenfold already uses (plotters' own encoder
    // would build a second version of it).
    let (width, height) = (900u32, 600u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    draw(
        BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area(),
        chart,
    )
    .with_context(|| format!("cannot draw {}", png.display()))?;
    image::RgbImage::from_raw(width, height, pixels)
        .context("the bitmap buffer has the wrong size")?
        .save_with_format(&png_tmp, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", png.display()))?;
    std::fs::rename(&png_tmp, &png).with_context(|| format!("cannot write {}", png.display()))?;
    Ok((svg, png))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corner(points: &[(f64, f64)]) -> String {
        let bounds = ((0.0, 10.0), (0.0, 10.0));
        format!("{:?}", quietest_corner(points.iter().copied(), bounds, 4).0)
    }

    #[test]
    fn the_legend_goes_where_the_points_are_not() {
        // Loss falling with compute fills the lower right and upper left; the upper right is free.
        let falling: Vec<(f64, f64)> = (0..=10).map(|i| (i as f64, 10.0 - i as f64)).collect();
        assert_eq!(corner(&falling), "UpperRight");
        // Rising accuracy leaves the lower right free, the default.
        let rising: Vec<(f64, f64)> = (0..=10).map(|i| (i as f64, i as f64)).collect();
        assert_eq!(corner(&rising), "LowerRight");
        let mut busy_right = rising.clone();
        busy_right.extend([(9.5, 0.5), (9.0, 9.5), (9.5, 1.0)]);
        assert_eq!(corner(&busy_right), "UpperLeft");
        // Twenty series leave no free corner: the axis grows to the right, where the legend goes, so
        // every point stays left of the legend box.
        let everywhere: Vec<(f64, f64)> = (0..=10)
            .flat_map(|i| {
                [
                    (i as f64, i as f64),
                    (i as f64, 10.0 - i as f64),
                    (i as f64, 5.0),
                ]
            })
            .collect();
        let bounds = ((0.0, 10.0), (0.0, 10.0));
        let (position, x1) = legend_placement(everywhere.iter().copied(), bounds, 20);
        assert_eq!(format!("{position:?}"), "UpperRight");
        assert!((x1 - 10.0 / 0.6).abs() < 1e-9);
        let box_left = x1 - LEGEND_WIDTH * x1;
        assert!(everywhere.iter().all(|&(x, _)| x <= box_left + 1e-9));
        let (_, unchanged) = legend_placement(rising.iter().copied(), bounds, 4);
        assert_eq!(unchanged, 10.0);
    }
}
