//! Line plots written straight to PNG, with no plotting crate: a white canvas, a framed data area with light grey
//! gridlines at "nice" ticks (1, 2 or 5 × 10^k), tick labels, a title and axis labels drawn in a built-in 5×7 bitmap
//! font, and per series an optional shaded band (low..high, the series colour at 25% over the background), the
//! mean as a 2-px line and small markers at the points. A legend (colour swatch + label) goes in whichever corner of
//! the data area it hides the least data in.
//!
//! Non-finite values are skipped and break the line (and band) there; a series of one point shows as a marker;
//! a constant series gets a padded range so that it sits mid-plot. Points are joined in the order given.
use std::path::Path;

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
const LINE_PX: f64 = 2.0;
/// Fraction of the data range added on each side, so that extreme points are not drawn on the frame.
const X_MARGIN: f64 = 0.03;
const Y_MARGIN: f64 = 0.05;

const WHITE: [u8; 3] = [255, 255, 255];
const GRID: [u8; 3] = [225, 225, 225];
const AXIS: [u8; 3] = [40, 40, 40];
const TEXT: [u8; 3] = [20, 20, 20];
const LEGEND_BORDER: [u8; 3] = [160, 160, 160];

/// Draws `series` as a line plot described by `spec` and writes it as an RGB PNG at `path` (atomically: via a
/// temporary file in the same folder, then a rename). See the module documentation for what is drawn.
///
/// Errors: no series, an `x` and `mean` (or band) of different lengths, a side of 0 or above 4096 pixels or too
/// small to hold the labels, or values spanning more than `f64` can represent are [`Error::Config`]; failing to
/// write is [`Error::Io`].
pub fn line_plot(path: &Path, spec: &PlotSpec, series: &[Series]) -> Result<()> {
    validate(spec, series)?;
    let layout = layout(spec, series)?;
    let canvas = render(spec, series, &layout);
    write_png(&canvas, path)
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

// ---------------------------------------------------------------------------------------------------------------
// Layout

/// A pixel rectangle, `x0..x1` × `y0..y1` (ends exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Rect {
    fn width(&self) -> i64 {
        self.x1 - self.x0
    }
    fn height(&self) -> i64 {
        self.y1 - self.y0
    }
    fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }
}

/// Where everything goes: text scale, the data area, the data ranges mapped onto it, and the ticks.
#[derive(Debug, Clone)]
struct Layout {
    /// Pixels per font pixel for labels (the title uses one more).
    scale: i64,
    /// The data area, inside the frame.
    plot: Rect,
    x_range: (f64, f64),
    y_range: (f64, f64),
    x_ticks: Ticks,
    y_ticks: Ticks,
}

impl Layout {
    /// Screen column (fractional) of abscissa `x`.
    fn sx(&self, x: f64) -> f64 {
        let (a, b) = self.x_range;
        self.plot.x0 as f64 + (x - a) / (b - a) * (self.plot.width() - 1) as f64
    }
    /// Screen row (fractional) of ordinate `y`; rows grow downwards.
    fn sy(&self, y: f64) -> f64 {
        let (a, b) = self.y_range;
        (self.plot.y1 - 1) as f64 - (y - a) / (b - a) * (self.plot.height() - 1) as f64
    }
    fn pad(&self) -> i64 {
        4 * self.scale
    }
    fn tick_len(&self) -> i64 {
        3 * self.scale
    }
    /// Whether the x tick labels, centred on their ticks, leave at least one character cell between neighbours.
    fn x_labels_fit(&self) -> bool {
        let t = &self.x_ticks;
        (1..t.values.len()).all(|i| {
            let room = self.sx(t.values[i]) - self.sx(t.values[i - 1]);
            let need = (text_width(&t.labels[i], self.scale) + text_width(&t.labels[i - 1], self.scale)) / 2
                + CELL_W as i64 * self.scale;
            room >= need as f64
        })
    }
}

/// Text scale from the image size: 1 for small images, larger so that labels stay readable on big ones.
fn text_scale(width: u32, height: u32) -> i64 {
    match width.min(height) {
        0..=359 => 1,
        360..=999 => 2,
        _ => 3,
    }
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

    let s = text_scale(spec.width, spec.height);
    let (w, h) = (spec.width as i64, spec.height as i64);
    let (pad, tick, line) = (4 * s, 3 * s, CELL_H as i64 * s);
    let top = pad + if spec.title.is_empty() { 0 } else { CELL_H as i64 * (s + 1) + pad };
    let bottom = 1 + tick + pad / 2 + line + if spec.x_label.is_empty() { 0 } else { pad / 2 + line } + pad;
    // Fewer y ticks on short plots: keep about four text lines between them.
    let y_target = ((h - top - bottom) / (4 * line)).clamp(2, 5) as usize;
    let y_ticks = nice_ticks(y_range.0, y_range.1, y_target);
    let widest = |t: &Ticks| t.labels.iter().map(|l| text_width(l, s)).max().unwrap_or(0);
    let left = pad + if spec.y_label.is_empty() { 0 } else { line + pad } + widest(&y_ticks) + pad / 2 + tick + 1;
    let x_ticks = nice_ticks(x_range.0, x_range.1, 5);
    // Room for half of the last x tick label, which is centred on the right edge of the data area.
    let right = (2 * pad).max(widest(&x_ticks) / 2 + pad);
    let plot = Rect { x0: left, y0: top, x1: w - right, y1: h - bottom };
    if plot.width() < MIN_PLOT || plot.height() < MIN_PLOT {
        return Err(Error::Config(format!(
            "line_plot: a {w}×{h} image leaves only {}×{} pixels for the data after the title, labels and ticks; \
             make it larger",
            plot.width().max(0),
            plot.height().max(0)
        )));
    }
    let mut layout = Layout { scale: s, plot, x_range, y_range, x_ticks, y_ticks };
    for target in [4, 3, 2] {
        if layout.x_labels_fit() {
            break;
        }
        layout.x_ticks = nice_ticks(x_range.0, x_range.1, target);
    }
    Ok(layout)
}

// ---------------------------------------------------------------------------------------------------------------
// Drawing

/// An RGB image plus a record of which pixels hold data (for placing the legend).
struct Canvas {
    width: i64,
    height: i64,
    rgb: Vec<u8>,
    data: Vec<bool>,
}

impl Canvas {
    fn new(width: i64, height: i64) -> Self {
        let n = (width * height) as usize;
        Self { width, height, rgb: WHITE.repeat(n), data: vec![false; n] }
    }
    fn index(&self, x: i64, y: i64) -> Option<usize> {
        (x >= 0 && y >= 0 && x < self.width && y < self.height).then(|| (y * self.width + x) as usize)
    }
    #[cfg(test)]
    fn get(&self, x: i64, y: i64) -> Option<[u8; 3]> {
        self.index(x, y).map(|i| [self.rgb[3 * i], self.rgb[3 * i + 1], self.rgb[3 * i + 2]])
    }
    /// Sets a pixel; pixels outside the image are ignored (text and markers may overhang).
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if let Some(i) = self.index(x, y) {
            self.rgb[3 * i..3 * i + 3].copy_from_slice(&c);
        }
    }
    /// Mixes `c` over the pixel with opacity `alpha`.
    fn blend(&mut self, x: i64, y: i64, c: [u8; 3], alpha: f64) {
        if let Some(i) = self.index(x, y) {
            for k in 0..3 {
                let under = self.rgb[3 * i + k] as f64;
                self.rgb[3 * i + k] = ((1.0 - alpha) * under + alpha * c[k] as f64).round() as u8;
            }
        }
    }
    /// A data pixel: clipped to the data area and recorded as data.
    fn put_data(&mut self, clip: &Rect, x: i64, y: i64, c: [u8; 3]) {
        if clip.contains(x, y) {
            self.put(x, y, c);
            if let Some(i) = self.index(x, y) {
                self.data[i] = true;
            }
        }
    }
    fn fill(&mut self, r: Rect, c: [u8; 3]) {
        for y in r.y0.max(0)..r.y1.min(self.height) {
            for x in r.x0.max(0)..r.x1.min(self.width) {
                self.put(x, y, c);
            }
        }
    }
    /// A one-pixel rectangle outline just inside `r`.
    fn outline(&mut self, r: Rect, c: [u8; 3]) {
        self.fill(Rect { y1: r.y0 + 1, ..r }, c);
        self.fill(Rect { y0: r.y1 - 1, ..r }, c);
        self.fill(Rect { x1: r.x0 + 1, ..r }, c);
        self.fill(Rect { x0: r.x1 - 1, ..r }, c);
    }
    /// Pixels of `r` that hold data.
    fn data_in(&self, r: Rect) -> usize {
        let mut n = 0;
        for y in r.y0.max(0)..r.y1.min(self.height) {
            for x in r.x0.max(0)..r.x1.min(self.width) {
                n += self.data[(y * self.width + x) as usize] as usize;
            }
        }
        n
    }
}

/// A square brush of `size` pixels centred on `(x, y)` (for size 2: the two pixels nearest on each axis).
fn stamp(c: &mut Canvas, clip: &Rect, x: f64, y: f64, size: f64, color: [u8; 3]) {
    let (x0, y0) = ((x - size / 2.0 + 0.5).floor() as i64, (y - size / 2.0 + 0.5).floor() as i64);
    for dy in 0..size as i64 {
        for dx in 0..size as i64 {
            c.put_data(clip, x0 + dx, y0 + dy, color);
        }
    }
}

/// A thick line from `a` to `b`, stamping the brush at every pixel step along the longer axis.
fn segment(c: &mut Canvas, clip: &Rect, a: (f64, f64), b: (f64, f64), color: [u8; 3]) {
    let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as usize;
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        stamp(c, clip, a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1), LINE_PX, color);
    }
}

/// A filled disc of radius `r` around the pixel nearest `(x, y)`.
fn marker(c: &mut Canvas, clip: &Rect, x: f64, y: f64, r: f64, color: [u8; 3]) {
    let (cx, cy, ri) = (x.round() as i64, y.round() as i64, r.ceil() as i64);
    for dy in -ri..=ri {
        for dx in -ri..=ri {
            if (dx * dx + dy * dy) as f64 <= r * r {
                c.put_data(clip, cx + dx, cy + dy, color);
            }
        }
    }
}

fn marker_radius(l: &Layout) -> f64 {
    1.5 + l.scale as f64
}

/// Shades the series' band: the area between the low and high polylines over each pair of consecutive points
/// where both are finite, or a short vertical bar at a point with no such neighbour. Coverage is collected first
/// so that every pixel is blended once however many pieces cover it.
fn band(c: &mut Canvas, l: &Layout, s: &Series) {
    let Some((low, high)) = &s.band else { return };
    let p = l.plot;
    let mut cover = vec![false; (p.width() * p.height()) as usize];
    let mut mark = |x: i64, ya: f64, yb: f64| {
        if x < p.x0 || x >= p.x1 {
            return;
        }
        let (y0, y1) = (ya.min(yb).round() as i64, ya.max(yb).round() as i64);
        for y in y0.max(p.y0)..=y1.min(p.y1 - 1) {
            cover[((y - p.y0) * p.width() + x - p.x0) as usize] = true;
        }
    };
    let point = |i: usize| {
        let (x, lo, hi) = (s.x[i], low[i], high[i]);
        (x.is_finite() && lo.is_finite() && hi.is_finite()).then(|| (l.sx(x), l.sy(lo), l.sy(hi)))
    };
    let n = s.x.len();
    for i in 0..n {
        let Some(a) = point(i) else { continue };
        let next = if i + 1 < n { point(i + 1) } else { None };
        if let Some(b) = next {
            let (a, b) = if a.0 <= b.0 { (a, b) } else { (b, a) };
            for x in a.0.round() as i64..=b.0.round() as i64 {
                let t = if b.0 - a.0 < 1e-9 { 0.0 } else { ((x as f64 - a.0) / (b.0 - a.0)).clamp(0.0, 1.0) };
                mark(x, a.1 + t * (b.1 - a.1), a.2 + t * (b.2 - a.2));
            }
        }
        let prev = if i > 0 { point(i - 1) } else { None };
        if prev.is_none() && next.is_none() {
            let r = marker_radius(l).round() as i64;
            for dx in -r..=r {
                mark(a.0.round() as i64 + dx, a.1, a.2);
            }
        }
    }
    for (k, _) in cover.iter().enumerate().filter(|(_, &v)| v) {
        let (x, y) = (p.x0 + k as i64 % p.width(), p.y0 + k as i64 / p.width());
        c.blend(x, y, s.color, BAND_ALPHA);
        c.data[(y * c.width + x) as usize] = true;
    }
}

/// The mean polyline, broken at non-finite values, with markers at the points when they are sparse enough to
/// tell apart (at most one per 8 columns on average) and always at isolated points, which have no line.
fn mean_line(c: &mut Canvas, l: &Layout, s: &Series) {
    let point = |i: usize| {
        let (x, y) = (s.x[i], s.mean[i]);
        (x.is_finite() && y.is_finite()).then(|| (l.sx(x), l.sy(y)))
    };
    let n = s.x.len();
    let finite = (0..n).filter(|&i| point(i).is_some()).count();
    let all_markers = finite as i64 <= l.plot.width() / 8;
    for i in 0..n {
        let Some(a) = point(i) else { continue };
        let next = if i + 1 < n { point(i + 1) } else { None };
        let prev = if i > 0 { point(i - 1) } else { None };
        if let Some(b) = next {
            segment(c, &l.plot, a, b, s.color);
        }
        if all_markers || (prev.is_none() && next.is_none()) {
            marker(c, &l.plot, a.0, a.1, marker_radius(l), s.color);
        }
    }
}

fn render(spec: &PlotSpec, series: &[Series], l: &Layout) -> Canvas {
    let (w, h) = (spec.width as i64, spec.height as i64);
    let mut c = Canvas::new(w, h);
    let p = l.plot;
    let (s, pad, tick) = (l.scale, l.pad(), l.tick_len());
    for &v in &l.x_ticks.values {
        let x = l.sx(v).round() as i64;
        c.fill(Rect { x0: x, x1: x + 1, ..p }, GRID);
    }
    for &v in &l.y_ticks.values {
        let y = l.sy(v).round() as i64;
        c.fill(Rect { y0: y, y1: y + 1, ..p }, GRID);
    }
    // Bands under all lines, so that no band hides another series' mean.
    for sr in series {
        band(&mut c, l, sr);
    }
    for sr in series {
        mean_line(&mut c, l, sr);
    }
    c.outline(Rect { x0: p.x0 - 1, y0: p.y0 - 1, x1: p.x1 + 1, y1: p.y1 + 1 }, AXIS);
    let glyph_h = GLYPH_H as i64 * s;
    for (v, label) in l.x_ticks.values.iter().zip(&l.x_ticks.labels) {
        let x = l.sx(*v).round() as i64;
        c.fill(Rect { x0: x, x1: x + 1, y0: p.y1 + 1, y1: p.y1 + 1 + tick }, AXIS);
        let tw = text_width(label, s);
        draw_text(&mut c, x - tw / 2, p.y1 + 1 + tick + pad / 2, label, s, TEXT);
    }
    for (v, label) in l.y_ticks.values.iter().zip(&l.y_ticks.labels) {
        let y = l.sy(*v).round() as i64;
        c.fill(Rect { x0: p.x0 - 1 - tick, x1: p.x0 - 1, y0: y, y1: y + 1 }, AXIS);
        let tw = text_width(label, s);
        draw_text(&mut c, p.x0 - 1 - tick - pad / 2 - tw, y - glyph_h / 2, label, s, TEXT);
    }
    // Texts too long for their space are cut rather than drawn off the image; a long title first shrinks.
    if !spec.title.is_empty() {
        let (ts, title) = fit_title(spec.title, s, w - 2 * pad);
        let tw = text_width(&title, ts);
        draw_text(&mut c, ((w - tw) / 2).max(pad), pad, &title, ts, TEXT);
    }
    if !spec.x_label.is_empty() {
        let label = fit(spec.x_label, s, w - 2 * pad);
        let tw = text_width(&label, s);
        let x = (p.x0 + (p.width() - tw) / 2).clamp(pad, (w - pad - tw).max(pad));
        let y = p.y1 + 1 + tick + pad / 2 + CELL_H as i64 * s + pad / 2;
        draw_text(&mut c, x, y, &label, s, TEXT);
    }
    if !spec.y_label.is_empty() {
        let label = fit(spec.y_label, s, p.height());
        let tw = text_width(&label, s);
        draw_text_up(&mut c, pad, p.y0 + (p.height() + tw) / 2, &label, s, TEXT);
    }
    legend(&mut c, l, series);
    c
}

/// The legend: a white box with a swatch (band shade, line and marker) and the label of every labelled series,
/// in the corner of the data area covering the fewest data pixels (top right, top left, bottom right, bottom left
/// on ties). Labels too long for the data area are cut.
fn legend(c: &mut Canvas, l: &Layout, series: &[Series]) {
    let rows: Vec<&Series> = series.iter().filter(|s| !s.label.is_empty()).collect();
    if rows.is_empty() {
        return;
    }
    let (s, p) = (l.scale, l.plot);
    let (inner, margin, swatch_w, row_h) = (3 * s, 4 * s, 14 * s, CELL_H as i64 * s + 2 * s);
    let max_chars = (p.width() - 2 * margin - 3 * inner - swatch_w) / (CELL_W as i64 * s);
    if max_chars < 1 {
        return;
    }
    let labels: Vec<String> = rows.iter().map(|r| r.label.chars().take(max_chars as usize).collect()).collect();
    let text_w = labels.iter().map(|t| text_width(t, s)).max().unwrap_or(0);
    let (bw, bh) = (3 * inner + swatch_w + text_w, 2 * inner + rows.len() as i64 * row_h - 2 * s);
    let at = |x0: i64, y0: i64| Rect { x0, y0, x1: x0 + bw, y1: y0 + bh };
    let (left, right, top, bottom) = (p.x0 + margin, p.x1 - margin - bw, p.y0 + margin, p.y1 - margin - bh);
    let corners = [at(right, top), at(left, top), at(right, bottom), at(left, bottom)];
    // min_by_key keeps the first of equal keys, so the order above is the preference on ties.
    let Some(&b) = corners.iter().min_by_key(|r| c.data_in(**r)) else {
        return;
    };
    c.fill(b, WHITE);
    c.outline(b, LEGEND_BORDER);
    let whole = Rect { x0: 0, y0: 0, x1: c.width, y1: c.height };
    for (i, (sr, label)) in rows.iter().zip(&labels).enumerate() {
        let y = b.y0 + inner + i as i64 * row_h;
        let mid = y + (GLYPH_H as i64 * s) / 2;
        let sw = Rect { x0: b.x0 + inner, y0: y, x1: b.x0 + inner + swatch_w, y1: y + GLYPH_H as i64 * s };
        if sr.band.is_some() {
            for yy in sw.y0..sw.y1 {
                for xx in sw.x0..sw.x1 {
                    c.blend(xx, yy, sr.color, BAND_ALPHA);
                }
            }
        }
        segment(c, &whole, (sw.x0 as f64, mid as f64), ((sw.x1 - 1) as f64, mid as f64), sr.color);
        marker(c, &whole, (sw.x0 + sw.x1) as f64 / 2.0, mid as f64, marker_radius(l), sr.color);
        draw_text(c, sw.x1 + inner, y, label, s, TEXT);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Font

/// Glyph size in font pixels.
const GLYPH_W: usize = 5;
const GLYPH_H: usize = 7;
/// Character cell: one column of spacing, and one row below the glyph for descenders.
const CELL_W: usize = GLYPH_W + 1;
const CELL_H: usize = GLYPH_H + 1;
/// Glyphs drawn one row lower, reaching into the descender row.
const DESCENDERS: &str = "gjpqy";

/// A 5×7 bitmap font: `#` is ink. Lowercase letters use rows 2–6 (x-height 5) with ascenders from row 0;
/// descenders are drawn one row down (see [`DESCENDERS`]).
#[rustfmt::skip]
const FONT: &[(char, [&str; GLYPH_H])] = &[
    (' ', [".....", ".....", ".....", ".....", ".....", ".....", "....."]),
    ('0', [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."]),
    ('1', ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('2', [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"]),
    ('3', ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."]),
    ('4', ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."]),
    ('5', ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."]),
    ('6', ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."]),
    ('7', ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."]),
    ('8', [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."]),
    ('9', [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."]),
    ('A', [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('B', ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."]),
    ('C', [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."]),
    ('D', ["###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."]),
    ('E', ["#####", "#....", "#....", "####.", "#....", "#....", "#####"]),
    ('F', ["#####", "#....", "#....", "####.", "#....", "#....", "#...."]),
    ('G', [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"]),
    ('H', ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('I', [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('J', ["..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."]),
    ('K', ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"]),
    ('L', ["#....", "#....", "#....", "#....", "#....", "#....", "#####"]),
    ('M', ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"]),
    ('N', ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"]),
    ('O', [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('P', ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."]),
    ('Q', [".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"]),
    ('R', ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"]),
    ('S', [".####", "#....", "#....", ".###.", "....#", "....#", "####."]),
    ('T', ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."]),
    ('U', ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('V', ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('W', ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."]),
    ('X', ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"]),
    ('Y', ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."]),
    ('Z', ["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"]),
    ('a', [".....", ".....", ".###.", "....#", ".####", "#...#", ".####"]),
    ('b', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."]),
    ('c', [".....", ".....", ".###.", "#....", "#....", "#...#", ".###."]),
    ('d', ["....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"]),
    ('e', [".....", ".....", ".###.", "#...#", "#####", "#....", ".###."]),
    ('f', ["..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."]),
    ('g', [".....", ".####", "#...#", "#...#", ".####", "....#", ".###."]),
    ('h', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('i', ["..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."]),
    ('j', ["...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."]),
    ('k', ["#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."]),
    ('l', [".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('m', [".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"]),
    ('n', [".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('o', [".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."]),
    ('p', [".....", "####.", "#...#", "#...#", "####.", "#....", "#...."]),
    ('q', [".....", ".####", "#...#", "#...#", ".####", "....#", "....#"]),
    ('r', [".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."]),
    ('s', [".....", ".....", ".####", "#....", ".###.", "....#", "####."]),
    ('t', [".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."]),
    ('u', [".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"]),
    ('v', [".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('w', [".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."]),
    ('x', [".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"]),
    ('y', [".....", "#...#", "#...#", "#...#", ".####", "....#", ".###."]),
    ('z', [".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"]),
    ('.', [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."]),
    (',', [".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."]),
    ('-', [".....", ".....", ".....", "#####", ".....", ".....", "....."]),
    ('+', [".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."]),
    ('_', [".....", ".....", ".....", ".....", ".....", ".....", "#####"]),
    (':', [".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."]),
    ('/', [".....", "....#", "...#.", "..#..", ".#...", "#....", "....."]),
    ('(', ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."]),
    (')', [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."]),
    ('%', ["##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"]),
    ('=', [".....", ".....", "#####", ".....", "#####", ".....", "....."]),
    ('<', ["...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."]),
    ('>', [".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."]),
    ('|', ["..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."]),
    ('[', [".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."]),
    (']', [".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."]),
    ('\'', ["..#..", "..#..", ".#...", ".....", ".....", ".....", "....."]),
    ('!', ["..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#.."]),
    ('?', [".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."]),
    ('*', [".....", "..#..", "#.#.#", ".###.", "#.#.#", "..#..", "....."]),
];

/// Drawn for characters the font lacks, so that they show up as missing rather than vanish.
#[rustfmt::skip]
static UNKNOWN: [&str; GLYPH_H] = ["#####", "#...#", "#...#", "#...#", "#...#", "#...#", "#####"];

/// The glyph of `c` and how many rows it is lowered by.
fn glyph(c: char) -> (&'static [&'static str; GLYPH_H], i64) {
    match FONT.iter().find(|(g, _)| *g == c) {
        Some((_, rows)) => (rows, DESCENDERS.contains(c) as i64),
        None => (&UNKNOWN, 0),
    }
}

/// Width in pixels of `text` at `scale` (no spacing after the last character).
fn text_width(text: &str, scale: i64) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * CELL_W as i64 - 1) * scale
    }
}

/// The longest prefix of `text` at most `max_width` pixels wide at `scale`.
fn fit(text: &str, scale: i64, max_width: i64) -> String {
    let n = ((max_width + scale) / (CELL_W as i64 * scale)).max(0) as usize;
    text.chars().take(n).collect()
}

/// The title at the largest scale from `label_scale + 1` down to 1, but not below `label_scale − 1`, at which it
/// fits in `room` pixels; cut to `room` at the smallest of those scales when it fits at none.
fn fit_title(title: &str, label_scale: i64, room: i64) -> (i64, String) {
    let smallest = (label_scale - 1).max(1);
    let scale = (smallest..=label_scale + 1).rev().find(|&ts| text_width(title, ts) <= room).unwrap_or(smallest);
    (scale, fit(title, scale, room))
}

/// Calls `ink(column, row)` for every ink pixel of `text`, in font pixels from the top left of its first cell.
fn for_each_ink(text: &str, mut ink: impl FnMut(i64, i64)) {
    for (i, ch) in text.chars().enumerate() {
        let (rows, drop) = glyph(ch);
        for (gy, row) in rows.iter().enumerate() {
            for (gx, b) in row.bytes().enumerate() {
                if b == b'#' {
                    ink((i * CELL_W + gx) as i64, gy as i64 + drop);
                }
            }
        }
    }
}

/// Horizontal text with its top-left corner at `(x, y)`, each font pixel a `scale`×`scale` square.
fn draw_text(c: &mut Canvas, x: i64, y: i64, text: &str, scale: i64, color: [u8; 3]) {
    for_each_ink(text, |gx, gy| {
        c.fill(
            Rect { x0: x + gx * scale, y0: y + gy * scale, x1: x + (gx + 1) * scale, y1: y + (gy + 1) * scale },
            color,
        )
    });
}

/// Text rotated a quarter turn anticlockwise (reading upwards), starting at row `bottom`, the tops of the letters
/// facing left towards column `x`.
fn draw_text_up(c: &mut Canvas, x: i64, bottom: i64, text: &str, scale: i64, color: [u8; 3]) {
    for_each_ink(text, |gx, gy| {
        let (px, py) = (x + gy * scale, bottom - (gx + 1) * scale);
        c.fill(Rect { x0: px, y0: py, x1: px + scale, y1: py + scale }, color)
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Output

/// Encodes the canvas as an RGB PNG in memory, then writes it to a temporary file in the target's folder and
/// renames it into place (atomic on one filesystem), so that readers never see a half-written plot.
fn write_png(c: &Canvas, path: &Path) -> Result<()> {
    super::grid::write_png_bytes(&c.rgb, c.width as u32, c.height as u32, png::ColorType::Rgb, path)
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

    fn count(img: &image::RgbImage, c: [u8; 3]) -> usize {
        img.pixels().filter(|p| p.0 == c).count()
    }

    /// The colour of `c` blended at [`BAND_ALPHA`] over white, as the band is drawn where no gridline lies.
    fn light(c: [u8; 3]) -> [u8; 3] {
        c.map(|v| ((1.0 - BAND_ALPHA) * 255.0 + BAND_ALPHA * v as f64).round() as u8)
    }

    #[test]
    fn a_title_too_long_for_the_label_size_shrinks_once_before_it_is_cut() {
        // The multi-seed fidelity title of `lisa compare` on trajectories, on its 720-pixel plot (label scale 2):
        // once cut after "band = min-".
        let title = "trajectory: control fidelity vs step (3 seeds, band = min-max)";
        let room = 720 - 2 * 8;
        assert!(text_width(title, 2) > room);
        assert_eq!(fit_title(title, 2, room), (1, title.to_string()));
        // A title that fits one size up keeps it; one that fits at no allowed size is cut at the smallest.
        assert_eq!(fit_title("edges", 2, room), (3, "edges".to_string()));
        let (scale, cut) = fit_title(&"x".repeat(200), 2, room);
        assert_eq!(scale, 1);
        assert!(text_width(&cut, 1) <= room && cut.len() < 200, "{}", cut.len());
        assert_eq!(fit_title(&"x".repeat(200), 3, room).0, 2);
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
    }

    #[test]
    fn font_covers_the_required_characters_with_distinct_glyphs() {
        let required = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz .,-+_:/()%=<>|";
        for ch in required.chars() {
            let (rows, _) = glyph(ch);
            assert!(!std::ptr::eq(rows, &UNKNOWN), "{ch:?} has no glyph");
        }
        for (ch, rows) in FONT {
            assert!(rows.iter().all(|r| r.len() == GLYPH_W && r.bytes().all(|b| b == b'#' || b == b'.')), "{ch:?}");
            assert!(*ch == ' ' || rows.iter().any(|r| r.contains('#')), "{ch:?} is blank");
            assert!(*rows != UNKNOWN, "{ch:?} looks like the unknown box");
            let same: Vec<char> = FONT.iter().filter(|(_, r)| r == rows).map(|(c, _)| *c).collect();
            assert_eq!(same, [*ch], "identical glyphs");
        }
        assert!(std::ptr::eq(glyph('σ').0, &UNKNOWN));
        assert_eq!(text_width("ab", 2), 22);
    }

    #[test]
    fn plot_is_written_with_every_series_and_band() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.png");
        let x: Vec<f64> = (0..=10).map(|i| i as f64 * 100.0).collect();
        let a: Vec<f64> = x.iter().map(|v| 0.2 + 0.6 * (v / 1000.0)).collect();
        let b: Vec<f64> = x.iter().map(|v| 0.7 - 0.3 * (v / 1000.0).sqrt()).collect();
        let mut with_band = series("LISA", BLUE, x.clone(), a.clone());
        with_band.band = Some((a.iter().map(|v| v - 0.08).collect(), a.iter().map(|v| v + 0.08).collect()));
        line_plot(&path, &spec(480, 320), &[with_band, series("baseline", RED, x, b)]).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (480, 320));
        assert_eq!(img.get_pixel(0, 0).0, WHITE);
        // Far more pixels than the legend swatches hold: the lines themselves are drawn.
        assert!(count(&img, BLUE) > 400, "{}", count(&img, BLUE));
        assert!(count(&img, RED) > 400, "{}", count(&img, RED));
        assert!(count(&img, light(BLUE)) > 1000, "band: {}", count(&img, light(BLUE)));
        assert_eq!(count(&img, light(RED)), 0, "the second series has no band");
        assert!(count(&img, TEXT) > 200, "text is drawn");
        assert!(count(&img, GRID) > 500, "gridlines are drawn");
        // Only the plot is left in the folder, no temporary file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn nan_breaks_the_line_and_single_points_and_constants_are_drawn() {
        let x = vec![0.0, 1.0, 2.0, 3.0, 4.0];
        let broken = series("broken", BLUE, x.clone(), vec![5.0, 5.0, f64::NAN, 5.0, 5.0]);
        let sp = PlotSpec { title: "", x_label: "", y_label: "", width: 400, height: 300 };
        let l = layout(&sp, std::slice::from_ref(&broken)).unwrap();
        // A constant series gets a padded range and sits in the middle.
        assert!(l.y_range.0 < 5.0 && l.y_range.1 > 5.0 && (l.y_range.0 + l.y_range.1 - 10.0).abs() < 1e-9);
        let c = render(&sp, std::slice::from_ref(&broken), &l);
        let row = l.sy(5.0).round() as i64;
        let at = |x: f64| c.get(l.sx(x).round() as i64, row).unwrap();
        assert_eq!(at(0.5), BLUE);
        assert_eq!(at(3.5), BLUE);
        assert_ne!(at(1.6), BLUE, "the line continues across the missing value");
        assert_ne!(at(2.0), BLUE);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        // Unlabelled, so no legend: the only red is the point's marker, a disc of radius 2.5 (21 pixels).
        let one = series("", RED, vec![3.0], vec![0.5]);
        line_plot(&path, &spec(200, 150), &[one]).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (200, 150));
        assert_eq!(count(&img, RED), 21);
        // All values missing still draws empty axes rather than failing.
        let none = series("", RED, vec![f64::NAN], vec![1.0]);
        line_plot(&path, &spec(200, 150), &[none]).unwrap();
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

    /// Writes `target/plot-preview.png`, a realistic figure (three seeds' min–max bands, a gap, a long title) for
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
            title: "Control fidelity: edge_f1 vs training step (Fashion-MNIST 32x32)",
            x_label: "training step",
            y_label: "edge F1 (mean, min/max over seeds)",
            width: 800,
            height: 500,
        };
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/plot-preview.png");
        line_plot(Path::new(path), &sp, &series).unwrap();
        let small = concat!(env!("CARGO_MANIFEST_DIR"), "/target/plot-preview-small.png");
        line_plot(Path::new(small), &PlotSpec { width: 320, height: 220, ..sp }, &series).unwrap();
        let font = concat!(env!("CARGO_MANIFEST_DIR"), "/target/plot-preview-font.png");
        let sp = PlotSpec {
            title: "abcdefghijklmnopqrstuvwxyz 0123456789",
            x_label: "ABCDEFGHIJKLMNOPQRSTUVWXYZ .,-+_:/()%=<>| []'!?* σ",
            y_label: "Quick brown fox, jumpy dog",
            width: 1000,
            height: 400,
        };
        line_plot(Path::new(font), &sp, &series[..1]).unwrap();
    }
}
