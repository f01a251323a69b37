//! Line plots drawn with `plotters` and written as PNG: a white canvas, a framed data area with light grey
//! gridlines at "nice" ticks (1, 2 or 5 × 10^k), tick labels, a title and axis labels in the embedded DejaVu Sans
//! (no system fonts needed), and per series an optional shaded band (low..high, the series colour at 25%), the mean
//! as a 2-px line and small markers at the points. A legend (colour swatch + label) goes in whichever corner of the
//! data area holds the fewest data points.
//!
//! Non-finite values are skipped and break the line (and band) there; a point alone between gaps (or a series of one point) shows as a larger marker;
//! a constant series gets a padded range so that it sits mid-plot. Points are joined in the order given.
use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{Error, Result};

/// One curve of a [`line_plot`]: `mean[i]` is plotted at `x[i]`, optionally with a shaded band from `low[i]` to
/// `high[i]` (e.g. min..max or ±1 standard deviation over seeds). Non-finite values leave gaps.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text; series with an empty label are left out of the legend.
    pub label: String,
    /// Line colour, RGB.
    pub color: [u8; 3],
    /// Abscissae.
    pub x: Vec<f64>,
    /// Ordinates, one per abscissa.
    pub mean: Vec<f64>,
    /// Optional `(low, high)` band, each one value per abscissa.
    pub band: Option<(Vec<f64>, Vec<f64>)>,
}

/// Title, axis labels and pixel size of a [`line_plot`]. Empty strings leave the corresponding text out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlotSpec<'a> {
    /// Text centred above the plot.
    pub title: &'a str,
    /// Text under the x axis.
    pub x_label: &'a str,
    /// Text along the y axis, reading upwards.
    pub y_label: &'a str,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
}

/// Largest accepted image side: far beyond any figure, small enough that a typo cannot allocate gigabytes.
const MAX_SIDE: u32 = 4096;
/// Smallest data area (pixels, each side) left after titles, labels and ticks; below this nothing is readable.
const MIN_PLOT: i64 = 24;
/// Opacity of a band over what lies beneath it.
const BAND_ALPHA: f64 = 0.25;
/// Line thickness of the mean, pixels.
const LINE_PX: u32 = 2;
/// Series with more points than this are drawn without markers (the line alone reads better).
const MAX_MARKED_POINTS: usize = 60;
/// Fraction of the data range added on each side, so that extreme points are not drawn on the frame.
const X_MARGIN: f64 = 0.03;
const Y_MARGIN: f64 = 0.05;

const GRID: RGBColor = RGBColor(225, 225, 225);
const AXIS: RGBColor = RGBColor(40, 40, 40);
const TEXT: RGBColor = RGBColor(20, 20, 20);
const LEGEND_BORDER: RGBColor = RGBColor(160, 160, 160);

/// The family name under which the embedded font is registered with plotters.
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
static REGISTER_FONT: Once = Once::new();

/// Draws `series` as a line plot described by `spec` and writes it as an RGB PNG at `path` (atomically: via a
/// temporary file in the same folder, then a rename). See the module documentation for what is drawn.
///
/// Errors: no series, an `x` and `mean` (or band) of different lengths, a side of 0 or above 4096 pixels or too
/// small to hold the labels, or values spanning more than `f64` can represent are [`Error::Config`]; failing to
/// write is [`Error::Io`].
pub fn line_plot(path: &Path, spec: &PlotSpec, series: &[Series]) -> Result<()> {
    validate(spec, series)?;
    let layout = layout(spec, series)?;
    let rgb = render(spec, series, &layout)?;
    super::grid::write_png_bytes(&rgb, spec.width, spec.height, png::ColorType::Rgb, path)
}

fn validate(spec: &PlotSpec, series: &[Series]) -> Result<()> {
    if series.is_empty() {
        return Err(Error::Config("line_plot: no series to plot".into()));
    }
    for s in series {
        if s.x.len() != s.mean.len() {
            return Err(Error::Config(format!(
                "line_plot: series {:?} has {} x values but {} mean values; they must pair up",
                s.label,
                s.x.len(),
                s.mean.len()
            )));
        }
        if let Some((low, high)) = &s.band {
            if low.len() != s.x.len() || high.len() != s.x.len() {
                return Err(Error::Config(format!(
                    "line_plot: series {:?} has {} x values but a band of {} low and {} high values",
                    s.label,
                    s.x.len(),
                    low.len(),
                    high.len()
                )));
            }
        }
    }
    for (side, v) in [("width", spec.width), ("height", spec.height)] {
        if v == 0 || v > MAX_SIDE {
            return Err(Error::Config(format!("line_plot: {side} must be 1..={MAX_SIDE} pixels, got {v}")));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Ticks

/// Tick positions and their labels.
#[derive(Debug, Clone, PartialEq, Default)]
struct Ticks {
    values: Vec<f64>,
    labels: Vec<String>,
}

/// About `target` evenly spaced ticks inside `[lo, hi]` at multiples of a step 1, 2 or 5 × 10^k: the step whose
/// tick count is closest to `target` (the sparser on a tie). Values are computed as integer / power of ten, so that
/// 0.6 is the double nearest 0.6 rather than 3 × 0.2; labels are exact decimals with as many digits as the step
/// needs, or scientific notation for very small or large values. Empty when the range is empty or not finite.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Ticks {
    let target = target.max(2) as f64;
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Ticks::default();
    }
    let raw_exp = ((hi - lo) / target).log10().floor() as i32;
    let mut best: Option<(f64, f64, i32, i64)> = None; // (|count - target|, count, exp, mantissa)
    for exp in raw_exp - 1..=raw_exp + 1 {
        for m in [1i64, 2, 5] {
            let step = m as f64 * 10f64.powi(exp);
            let count = ((hi / step + 1e-9).floor() - (lo / step - 1e-9).ceil() + 1.0).max(0.0);
            let miss = (count - target).abs();
            if best.map_or(true, |(b, bc, _, _)| miss < b || (miss == b && count < bc)) {
                best = Some((miss, count, exp, m));
            }
        }
    }
    let Some((_, _, exp, m)) = best else {
        return Ticks::default();
    };
    let step = m as f64 * 10f64.powi(exp);
    let (k0, k1) = ((lo / step - 1e-9).ceil(), (hi / step + 1e-9).floor());
    // Integer tick indices must stay exact in f64; a range this narrow relative to its offset is not plottable
    // anyway (the caller pads near-constant ranges long before this).
    if !(k0.abs() < 1e12 && k1.abs() < 1e12) || k1 < k0 {
        return Ticks::default();
    }
    let scale = 10f64.powi(exp.abs());
    let value = |n: f64| if exp < 0 { n / scale } else { n * scale };
    let ns: Vec<f64> = (k0 as i64..=k1 as i64).map(|k| (k * m) as f64).collect();
    let values: Vec<f64> = ns.iter().map(|&n| value(n)).collect();
    let biggest = values.iter().fold(0f64, |a, v| a.max(v.abs()));
    let scientific = exp < -4 || biggest >= 1e7;
    let labels = ns
        .iter()
        .zip(&values)
        .map(|(&n, &v)| {
            if n == 0.0 {
                if scientific || exp >= 0 {
                    "0".to_string()
                } else {
                    fixed_label(0, exp)
                }
            } else if scientific {
                format!("{v:e}")
            } else {
                fixed_label(n as i64, exp)
            }
        })
        .collect();
    Ticks { values, labels }
}

/// `n × 10^exp` as an exact decimal string (`exp` ≥ -4 and the value below 10^7, so no overflow).
fn fixed_label(n: i64, exp: i32) -> String {
    if exp >= 0 {
        return (n as i128 * 10i128.pow(exp as u32)).to_string();
    }
    let decimals = (-exp) as usize;
    let digits = format!("{:0>width$}", n.unsigned_abs(), width = decimals + 1);
    let (int, frac) = digits.split_at(digits.len() - decimals);
    format!("{}{int}.{frac}", if n < 0 { "-" } else { "" })
}

/// The smallest and largest value seen.
#[derive(Debug, Clone, Copy)]
struct Extent {
    lo: f64,
    hi: f64,
}

impl Extent {
    fn new() -> Self {
        Self { lo: f64::INFINITY, hi: f64::NEG_INFINITY }
    }
    fn add(&mut self, v: f64) {
        self.lo = self.lo.min(v);
        self.hi = self.hi.max(v);
    }
    /// The range to plot: `[0, 1]` when nothing was seen, ±10% (or ±1 around 0) around a constant, else the data
    /// range widened by `margin` of itself on each side.
    fn padded(self, margin: f64, axis: &str) -> Result<(f64, f64)> {
        let (lo, hi) = if self.lo > self.hi { (0.0, 1.0) } else { (self.lo, self.hi) };
        let span = hi - lo;
        let (lo, hi) = if span <= 1e-9 * lo.abs().max(hi.abs()) {
            let mid = 0.5 * lo + 0.5 * hi;
            let d = if mid == 0.0 { 1.0 } else { 0.1 * mid.abs() };
            (mid - d, mid + d)
        } else {
            (lo - margin * span, hi + margin * span)
        };
        if !(hi - lo).is_finite() {
            return Err(Error::Config(format!(
                "line_plot: {axis} values from {} to {} span more than a double can hold; rescale them",
                self.lo, self.hi
            )));
        }
        Ok((lo, hi))
    }
}

/// The value at `i` of the band's low and high and of the mean, each `None` unless finite.
fn ys_at(s: &Series, i: usize) -> [Option<f64>; 3] {
    let finite = |v: f64| v.is_finite().then_some(v);
    let (lo, hi) = match &s.band {
        Some((lo, hi)) => (finite(lo[i]), finite(hi[i])),
        None => (None, None),
    };
    [finite(s.mean[i]), lo, hi]
}

// ---------------------------------------------------------------------------------------------------------------
// Layout

/// Font sizes (pixels) and the margins they need.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sizes {
    title: f64,
    label: f64,
    tick: f64,
    pad: i64,
}

/// Font sizes from the image size: small for small images, larger so that labels stay readable on big ones.
fn sizes(width: u32, height: u32) -> Sizes {
    match width.min(height) {
        0..=359 => Sizes { title: 13.0, label: 11.0, tick: 10.0, pad: 4 },
        360..=999 => Sizes { title: 17.0, label: 14.0, tick: 12.0, pad: 8 },
        _ => Sizes { title: 24.0, label: 20.0, tick: 17.0, pad: 12 },
    }
}

/// Ranges, ticks and margins of one plot.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    sizes: Sizes,
    /// The title's font size: [`Sizes::title`], or smaller where the title would not fit.
    title_size: f64,
    x_range: (f64, f64),
    y_range: (f64, f64),
    x_ticks: Ticks,
    y_ticks: Ticks,
    /// Pixels above the data area (the title), left of it (y label and tick labels) and below it (x tick labels
    /// and the x label).
    top: i64,
    left: i64,
    bottom: i64,
    right: i64,
}

/// Width in pixels of `text` at font size `size`, from the embedded font's advances.
fn text_width(text: &str, size: f64) -> i64 {
    register_font();
    let font = (FONT, size).into_font();
    font.box_size(text).map_or((text.chars().count() as f64 * size * 0.6) as i64, |(w, _)| w as i64)
}

fn register_font() {
    REGISTER_FONT.call_once(|| {
        // The bytes are the font file shipped in the binary; a failure here is a broken build, not user input.
        if plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_err() {
            panic!("the embedded DejaVu Sans is not a valid font");
        }
    });
}

fn layout(spec: &PlotSpec, series: &[Series]) -> Result<Layout> {
    // Ranges over points with a finite x and at least one finite y; everything else is not drawn.
    let (mut xe, mut ye) = (Extent::new(), Extent::new());
    for s in series {
        for (i, &x) in s.x.iter().enumerate() {
            let ys = ys_at(s, i);
            if x.is_finite() && ys.iter().any(Option::is_some) {
                xe.add(x);
                ys.iter().flatten().for_each(|&y| ye.add(y));
            }
        }
    }
    let x_range = xe.padded(X_MARGIN, "x")?;
    let y_range = ye.padded(Y_MARGIN, "y")?;
    let z = sizes(spec.width, spec.height);
    let (w, h) = (spec.width as i64, spec.height as i64);
    let line = |size: f64| size.ceil() as i64 + z.pad / 2;
    // A title wider than the image is set smaller, down to the tick size, and then left to be cut at the edges.
    let title_room = (w - 2 * z.pad).max(1);
    let title_width = text_width(spec.title, z.title).max(1);
    let title_size = if title_width <= title_room { z.title } else { (z.title * title_room as f64 / title_width as f64).max(z.tick) };
    let top = z.pad + if spec.title.is_empty() { 0 } else { line(z.title) + z.pad };
    let bottom = z.pad + line(z.tick) + if spec.x_label.is_empty() { 0 } else { line(z.label) } + z.pad;
    // Fewer y ticks on short plots: keep about four text lines between them.
    let y_target = ((h - top - bottom) / (4 * line(z.tick))).clamp(2, 5) as usize;
    let y_ticks = nice_ticks(y_range.0, y_range.1, y_target);
    let widest = |t: &Ticks| t.labels.iter().map(|l| text_width(l, z.tick)).max().unwrap_or(0);
    let left = z.pad + if spec.y_label.is_empty() { 0 } else { line(z.label) } + widest(&y_ticks) + 2 * z.pad;
    let mut x_ticks = nice_ticks(x_range.0, x_range.1, 5);
    // Room for half of the last x tick label, which may sit on the right edge of the data area.
    let right = (2 * z.pad).max(widest(&x_ticks) / 2 + z.pad);
    let (plot_w, plot_h) = (w - left - right, h - top - bottom);
    if plot_w < MIN_PLOT || plot_h < MIN_PLOT {
        return Err(Error::Config(format!(
            "line_plot: a {w}×{h} image leaves only {}×{} pixels for the data after the title, labels and ticks; \
             make it larger",
            plot_w.max(0),
            plot_h.max(0)
        )));
    }
    // Fewer x ticks where their labels would touch.
    for target in [4, 3, 2] {
        let n = x_ticks.values.len().max(2) as i64;
        let need = widest(&x_ticks) + 2 * z.pad;
        if plot_w / (n - 1) >= need {
            break;
        }
        x_ticks = nice_ticks(x_range.0, x_range.1, target);
    }
    Ok(Layout { sizes: z, title_size, x_range, y_range, x_ticks, y_ticks, top, left, bottom, right })
}

/// The label of the tick nearest `v` (the mesh asks for labels at exactly the tick values).
fn tick_label(ticks: &Ticks, v: f64) -> String {
    ticks
        .values
        .iter()
        .zip(&ticks.labels)
        .min_by(|a, b| (a.0 - v).abs().total_cmp(&(b.0 - v).abs()))
        .map_or_else(|| format!("{v}"), |(_, l)| l.clone())
}

// ---------------------------------------------------------------------------------------------------------------
// Drawing

fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// Maximal runs of consecutive indices for which `ok(i)` holds.
fn runs(n: usize, ok: impl Fn(usize) -> bool) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    for i in 0..=n {
        match (start, i < n && ok(i)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                out.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// The corner of the data area (as a plotters legend position) holding the fewest data points, counting points
/// inside the corner's box of 35% × 25% of the area (about a legend's size); the upper right wins ties.
fn legend_corner(l: &Layout, series: &[Series]) -> SeriesLabelPosition {
    let frac = |v: f64, (a, b): (f64, f64)| (v - a) / (b - a);
    let mut counts = [0usize; 4]; // upper right, upper left, lower right, lower left
    for s in series {
        for (i, &x) in s.x.iter().enumerate() {
            let fx = frac(x, l.x_range);
            for y in ys_at(s, i).into_iter().flatten() {
                let fy = frac(y, l.y_range);
                let (right, left, up, down) = (fx > 0.65, fx < 0.35, fy > 0.75, fy < 0.25);
                for (k, inside) in [(0, right && up), (1, left && up), (2, right && down), (3, left && down)] {
                    counts[k] += inside as usize;
                }
            }
        }
    }
    let best = (0..4).min_by_key(|&k| (counts[k], k)).unwrap_or(0);
    match best {
        0 => SeriesLabelPosition::UpperRight,
        1 => SeriesLabelPosition::UpperLeft,
        2 => SeriesLabelPosition::LowerRight,
        _ => SeriesLabelPosition::LowerLeft,
    }
}

fn render(spec: &PlotSpec, series: &[Series], l: &Layout) -> Result<Vec<u8>> {
    register_font();
    let (w, h) = (spec.width, spec.height);
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let drawn = draw(&root, spec, series, l).and_then(|()| Ok(root.present()?));
        drawn.map_err(|e| Error::Config(format!("line_plot: drawing failed: {e}")))?;
    }
    Ok(buf)
}

/// A linear axis whose gridlines and labels sit at our own [`nice_ticks`] (exact decimal labels).
struct TickedAxis {
    range: (f64, f64),
    ticks: Vec<f64>,
}

impl Ranged for TickedAxis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let (a, b) = self.range;
        let t = (v - a) / (b - a);
        limit.0 + ((limit.1 - limit.0) as f64 * t).round() as i32
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Minor gridlines are drawn transparent, so both kinds of hint get the ticks.
        let _ = hint;
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.0..self.range.1
    }
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(root: &DrawingArea<BitMapBackend, Shift>, spec: &PlotSpec, series: &[Series], l: &Layout) -> DrawResult {
    root.fill(&WHITE)?;
    let z = l.sizes;
    let title_style = (FONT, l.title_size).into_font().color(&TEXT);
    let mut builder = ChartBuilder::on(root);
    builder
        .margin_top(z.pad as u32)
        .margin_right(l.right as u32)
        .margin_left(z.pad as u32)
        .margin_bottom(z.pad as u32)
        .x_label_area_size((l.bottom - 2 * z.pad).max(0) as u32)
        .y_label_area_size((l.left - z.pad).max(0) as u32);
    if !spec.title.is_empty() {
        builder.caption(spec.title, title_style);
    }
    let (xr, yr) = (l.x_range, l.y_range);
    let x_axis = TickedAxis { range: xr, ticks: l.x_ticks.values.clone() };
    let y_axis = TickedAxis { range: yr, ticks: l.y_ticks.values.clone() };
    let mut chart = builder.build_cartesian_2d(x_axis, y_axis)?;
    let tick_font = (FONT, z.tick).into_font().color(&TEXT);
    let label_font = (FONT, z.label).into_font().color(&TEXT);
    let x_fmt = |v: &f64| tick_label(&l.x_ticks, *v);
    let y_fmt = |v: &f64| tick_label(&l.y_ticks, *v);
    let mut mesh = chart.configure_mesh();
    mesh.bold_line_style(GRID.stroke_width(1))
        .light_line_style(TRANSPARENT)
        .axis_style(AXIS.stroke_width(1))
        .x_label_style(tick_font.clone())
        .y_label_style(tick_font)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .x_desc(spec.x_label)
        .y_desc(spec.y_label)
        .axis_desc_style(label_font.clone());
    mesh.draw()?;

    let clip = |v: f64, (a, b): (f64, f64)| v.clamp(a, b);
    for s in series {
        if let Some((low, high)) = &s.band {
            let color = rgb(s.color).mix(BAND_ALPHA).filled();
            let ok = |i: usize| s.x[i].is_finite() && low[i].is_finite() && high[i].is_finite();
            for r in runs(s.x.len(), ok) {
                let mut poly: Vec<(f64, f64)> = r.clone().map(|i| (s.x[i], clip(high[i], yr))).collect();
                poly.extend(r.rev().map(|i| (s.x[i], clip(low[i], yr))));
                chart.draw_series(std::iter::once(Polygon::new(poly, color)))?;
            }
        }
    }
    for s in series {
        let color = rgb(s.color);
        let ok = |i: usize| s.x[i].is_finite() && s.mean[i].is_finite();
        let segments = runs(s.x.len(), ok);
        let points: usize = segments.iter().map(|r| r.len()).sum();
        let mut first = true;
        for r in &segments {
            let line = LineSeries::new(r.clone().map(|i| (s.x[i], s.mean[i])), color.stroke_width(LINE_PX));
            let drawn = chart.draw_series(line)?;
            if first && !s.label.is_empty() {
                drawn
                    .label(s.label.as_str())
                    .legend(move |(x, y)| Rectangle::new([(x, y - 3), (x + 16, y + 3)], color.filled()));
            }
            first = false;
        }
        if points <= MAX_MARKED_POINTS {
            // A point with no line through it (alone between gaps) gets the larger marker.
            let marks = segments.iter().flat_map(|r| {
                let radius = if r.len() == 1 { 3 } else { 2 };
                r.clone().map(move |i| Circle::new((s.x[i], s.mean[i]), radius, color.filled()))
            });
            chart.draw_series(marks)?;
        }
    }
    if series.iter().any(|s| !s.label.is_empty() && s.mean.iter().any(|v| v.is_finite())) {
        chart
            .configure_series_labels()
            .position(legend_corner(l, series))
            .background_style(WHITE.mix(0.9))
            .border_style(LEGEND_BORDER)
            .label_font(label_font)
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLUE: [u8; 3] = [31, 119, 180];
    const RED: [u8; 3] = [214, 39, 40];

    fn spec(width: u32, height: u32) -> PlotSpec<'static> {
        PlotSpec { title: "Edge F1 vs steps", x_label: "step", y_label: "edge_f1 (mean, min-max)", width, height }
    }

    fn series(label: &str, color: [u8; 3], x: Vec<f64>, mean: Vec<f64>) -> Series {
        Series { label: label.into(), color, x, mean, band: None }
    }

    /// Pixels within `tol` of colour `c` in every channel.
    fn count_near(img: &image::RgbImage, c: [u8; 3], tol: u8) -> usize {
        img.pixels().filter(|p| p.0.iter().zip(c).all(|(&a, b)| a.abs_diff(b) <= tol)).count()
    }

    fn count(img: &image::RgbImage, c: [u8; 3]) -> usize {
        count_near(img, c, 0)
    }

    /// The colour of `c` blended at [`BAND_ALPHA`] over white, as the band is drawn where no gridline lies.
    fn light(c: [u8; 3]) -> [u8; 3] {
        c.map(|v| ((1.0 - BAND_ALPHA) * 255.0 + BAND_ALPHA * v as f64).round() as u8)
    }

    fn plot(spec: &PlotSpec, series: &[Series]) -> image::RgbImage {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.png");
        line_plot(&path, spec, series).unwrap();
        image::open(&path).unwrap().to_rgb8()
    }

    #[test]
    fn ticks_are_nice() {
        let t = nice_ticks(0.0, 0.83, 5);
        assert_eq!(t.values, [0.0, 0.2, 0.4, 0.6, 0.8]);
        assert_eq!(t.labels, ["0.0", "0.2", "0.4", "0.6", "0.8"]);
        let t = nice_ticks(-3.0, 7.0, 5);
        assert_eq!(t.values, [-2.0, 0.0, 2.0, 4.0, 6.0]);
        assert_eq!(t.labels, ["-2", "0", "2", "4", "6"]);
        // Steps of 1000 give 4 ticks, of 500 give 7: the closer to 5 wins.
        let t = nice_ticks(0.0, 3000.0, 5);
        assert_eq!(t.labels, ["0", "1000", "2000", "3000"]);
        let t = nice_ticks(0.011, 0.0492, 5);
        assert_eq!(t.labels, ["0.02", "0.03", "0.04"]);
        let t = nice_ticks(-0.1, 0.1, 5);
        assert_eq!(t.labels, ["-0.10", "-0.05", "0.00", "0.05", "0.10"]);
        let t = nice_ticks(0.0, 2.4e-6, 5);
        assert_eq!(t.labels, ["0", "5e-7", "1e-6", "1.5e-6", "2e-6"]);
        let t = nice_ticks(0.0, 2.5e7, 3);
        assert_eq!(t.labels, ["0", "1e7", "2e7"]);
        assert_eq!(nice_ticks(1.0, 1.0, 5), Ticks::default());
        assert_eq!(nice_ticks(0.0, f64::NAN, 5), Ticks::default());
        assert_eq!(tick_label(&nice_ticks(0.0, 0.83, 5), 0.6000000001), "0.6");
    }

    #[test]
    fn the_embedded_font_sets_text_and_long_titles_shrink() {
        // Wider text is wider, and characters beyond ASCII that our titles use have glyphs with width.
        assert!(text_width("edge F1", 12.0) > text_width("F1", 12.0));
        for ch in ["σ", "×", "λ", "—", "≥"] {
            assert!(text_width(ch, 12.0) > 3, "{ch}");
        }
        let sp = PlotSpec { title: "trajectory: control fidelity vs step (3 seeds, band = min-max)", ..spec(320, 220) };
        let x = vec![0.0, 1.0];
        let l = layout(&sp, &[series("a", BLUE, x.clone(), x.clone())]).unwrap();
        assert!(l.title_size < sizes(320, 220).title);
        assert!(text_width(sp.title, l.title_size) <= 320 - 2 * l.sizes.pad + 1);
        let l = layout(&spec(320, 220), &[series("a", BLUE, x.clone(), x)]).unwrap();
        assert_eq!(l.title_size, sizes(320, 220).title);
    }

    #[test]
    fn plot_is_written_with_every_series_and_band() {
        let x: Vec<f64> = (0..=10).map(|i| i as f64 * 100.0).collect();
        let a: Vec<f64> = x.iter().map(|v| 0.2 + 0.6 * (v / 1000.0)).collect();
        let b: Vec<f64> = x.iter().map(|v| 0.7 - 0.3 * (v / 1000.0).sqrt()).collect();
        let mut with_band = series("LISA", BLUE, x.clone(), a.clone());
        with_band.band = Some((a.iter().map(|v| v - 0.08).collect(), a.iter().map(|v| v + 0.08).collect()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.png");
        line_plot(&path, &spec(480, 320), &[with_band, series("baseline", RED, x, b)]).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (480, 320));
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
        // Far more pixels than the legend swatches hold: the lines themselves are drawn.
        assert!(count(&img, BLUE) > 400, "{}", count(&img, BLUE));
        assert!(count(&img, RED) > 400, "{}", count(&img, RED));
        assert!(count_near(&img, light(BLUE), 2) > 1000, "band: {}", count_near(&img, light(BLUE), 2));
        // The second series has no band: only the anti-aliased rims of its markers come near that colour.
        assert!(count_near(&img, light(RED), 2) < 100, "{}", count_near(&img, light(RED), 2));
        assert!(count_near(&img, [20, 20, 20], 40) > 200, "text is drawn");
        assert!(count(&img, [225, 225, 225]) > 500, "gridlines are drawn");
        // Only the plot is left in the folder, no temporary file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn nan_breaks_the_line_and_single_points_and_constants_are_drawn() {
        let x = vec![0.0, 1.0, 2.0, 3.0, 4.0];
        let whole = series("", BLUE, x.clone(), vec![5.0; 5]);
        let broken = series("", BLUE, x, vec![5.0, 5.0, f64::NAN, 5.0, 5.0]);
        let sp = PlotSpec { title: "", x_label: "", y_label: "", width: 400, height: 300 };
        // A constant series gets a padded range and sits in the middle.
        let l = layout(&sp, std::slice::from_ref(&broken)).unwrap();
        assert!(l.y_range.0 < 5.0 && l.y_range.1 > 5.0 && (l.y_range.0 + l.y_range.1 - 10.0).abs() < 1e-9);
        // Without x = 1..3 half of the line is missing; the four markers stay.
        let (n_whole, n_broken) = (count(&plot(&sp, &[whole]), BLUE), count(&plot(&sp, &[broken]), BLUE));
        assert!(n_broken < n_whole * 3 / 4 && n_broken > n_whole / 4, "{n_broken} of {n_whole}");

        // Unlabelled, so no legend: the only red is the point's marker, a small disc.
        let img = plot(&spec(200, 150), &[series("", RED, vec![3.0], vec![0.5])]);
        assert_eq!(img.dimensions(), (200, 150));
        let red = count_near(&img, RED, 8);
        assert!((12..=60).contains(&red), "{red}");
        // All values missing still draws empty axes rather than failing.
        plot(&spec(200, 150), &[series("", RED, vec![f64::NAN], vec![1.0])]);
    }

    #[test]
    fn the_legend_avoids_the_data() {
        // A rising line fills the lower left and upper right corners: the legend goes upper left.
        let x: Vec<f64> = (0..=20).map(f64::from).collect();
        let rising = series("rising", BLUE, x.clone(), x.clone());
        let sp = spec(400, 300);
        let l = layout(&sp, std::slice::from_ref(&rising)).unwrap();
        assert!(matches!(legend_corner(&l, std::slice::from_ref(&rising)), SeriesLabelPosition::UpperLeft));
        let falling = series("falling", RED, x.clone(), x.iter().map(|v| 20.0 - v).collect());
        let l = layout(&sp, std::slice::from_ref(&falling)).unwrap();
        assert!(matches!(legend_corner(&l, std::slice::from_ref(&falling)), SeriesLabelPosition::UpperRight));
    }

    #[test]
    fn bad_input_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        let config = |r: Result<()>| matches!(r, Err(Error::Config(_)));
        let good = series("a", BLUE, vec![0.0, 1.0], vec![0.0, 1.0]);
        assert!(config(line_plot(&path, &spec(300, 200), &[])));
        assert!(config(line_plot(&path, &spec(300, 200), &[series("a", BLUE, vec![0.0, 1.0], vec![0.0])])));
        let mut banded = good.clone();
        banded.band = Some((vec![0.0, 1.0], vec![1.0]));
        assert!(config(line_plot(&path, &spec(300, 200), &[banded])));
        assert!(config(line_plot(&path, &spec(0, 200), std::slice::from_ref(&good))));
        assert!(config(line_plot(&path, &spec(40, 30), std::slice::from_ref(&good))));
        assert!(config(line_plot(&path, &spec(300, 200), &[series("a", BLUE, vec![-1e308, 1e308], vec![0.0, 1.0])])));
        assert!(!path.exists());
        let missing = dir.path().join("no-such-folder").join("plot.png");
        let err = line_plot(&missing, &spec(300, 200), &[good]).unwrap_err();
        assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("no-such-folder"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file left");
    }

    /// Writes `target/plot-preview*.png`, realistic figures (three seeds' min–max bands, a gap, a long title) for
    /// eyeballing the layout and the font: `cargo test --lib plot_preview -- --ignored`.
    #[test]
    #[ignore]
    fn plot_preview() {
        let x: Vec<f64> = (0..=30).map(|i| i as f64 * 100.0).collect();
        let curve = |rate: f64, top: f64, gap: bool| -> Series {
            let mean: Vec<f64> = x
                .iter()
                .map(|&v| if gap && (1200.0..1600.0).contains(&v) { f64::NAN } else { top * (1.0 - (-v / rate).exp()) })
                .collect();
            let low = mean.iter().map(|m| m - 0.04).collect();
            let high = mean.iter().map(|m| m + 0.03).collect();
            Series { label: String::new(), color: BLUE, x: x.clone(), mean, band: Some((low, high)) }
        };
        let series = [
            Series { label: "LISA (ours), 3 seeds".into(), ..curve(600.0, 0.83, false) },
            Series { label: "ControlNet baseline".into(), color: RED, ..curve(1200.0, 0.7, true) },
            Series { label: "no control".into(), color: [44, 160, 44], band: None, ..curve(1e9, 0.0, false) },
        ];
        let sp = PlotSpec {
            title: "Control fidelity: edge_f1 vs training step (Fashion-MNIST 32×32, λ = 0.2)",
            x_label: "training step",
            y_label: "edge F1 (mean, min/max over seeds)",
            width: 800,
            height: 500,
        };
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/plot-preview.png");
        line_plot(Path::new(path), &sp, &series).unwrap();
        let small = concat!(env!("CARGO_MANIFEST_DIR"), "/target/plot-preview-small.png");
        line_plot(Path::new(small), &PlotSpec { width: 320, height: 220, ..sp }, &series).unwrap();
    }
}
