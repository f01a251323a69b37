//! Condition extractors: pure, deterministic functions turning a grey image into a control map
//! (edges, mask, depth-like distance, low resolution, skeleton). They work on a small owned
//! [`GrayImage`] rather than tensors so that they are easy to test and bit-reproducible; tensor
//! conversions and a batch helper connect them to the training pipeline.
use std::fmt;
use std::str::FromStr;

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Default Gaussian σ (pixels) used by [`canny`] before differentiating.
pub const CANNY_SIGMA: f32 = 1.0;
/// Default low hysteresis threshold of [`ConditionKind::Edges`], on the gradient magnitude in
/// intensity units per pixel (a sharp 0→1 step blurred with σ = 1 peaks near 0.4).
pub const CANNY_LOW: f32 = 0.03;
/// Default high hysteresis threshold of [`ConditionKind::Edges`] (see [`CANNY_LOW`]).
pub const CANNY_HIGH: f32 = 0.08;
/// Default foreground threshold (intensity in `[0, 1]`) used by the mask, depth and skeleton maps;
/// Fashion-MNIST backgrounds are exactly 0, garments are brighter than this.
pub const MASK_THRESHOLD: f32 = 0.05;
/// Enclosed background regions of at most this many pixels are filled in the default mask (dark
/// prints and patterns inside a garment are not holes in its silhouette; a bag's handle loop is).
pub const MAX_HOLE_AREA: usize = 16;
/// Default downsampling factor of [`ConditionKind::LowRes`].
pub const LOW_RES_FACTOR: usize = 4;
/// Width (Gaussian σ, pixels) of the centre heatmap of [`ConditionKind::Trajectory`].
pub const TRAJECTORY_SIGMA: f32 = 1.5;

/// A grey image with `f32` values in `[0, 1]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GrayImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height` values, row after row.
    pub data: Vec<f32>,
}

impl GrayImage {
    /// A black image.
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0.0; width * height],
        }
    }

    /// An image whose pixel `(x, y)` is `f(x, y)`.
    pub fn from_fn(width: usize, height: usize, mut f: impl FnMut(usize, usize) -> f32) -> Self {
        let mut data = Vec::with_capacity(width * height);
        for y in 0..height {
            for x in 0..width {
                data.push(f(x, y));
            }
        }
        Self {
            width,
            height,
            data,
        }
    }

    /// The value at column `x`, row `y`.
    pub fn get(&self, x: usize, y: usize) -> f32 {
        self.data[y * self.width + x]
    }

    /// Sets the value at column `x`, row `y`.
    pub fn set(&mut self, x: usize, y: usize, v: f32) {
        self.data[y * self.width + x] = v;
    }

    /// Clamped read: coordinates outside the image take the nearest border pixel.
    fn clamped(&self, x: isize, y: isize) -> f32 {
        let x = x.clamp(0, self.width as isize - 1) as usize;
        let y = y.clamp(0, self.height as isize - 1) as usize;
        self.get(x, y)
    }

    /// From a tensor `[1, H, W]` (or `[H, W]`) with values in `[-1, 1]`, on any device.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let size = t.size();
        let (h, w) = match size.as_slice() {
            [1, h, w] | [h, w] => (*h as usize, *w as usize),
            _ => {
                return Err(Error::Config(format!(
                    "expected a [1, H, W] image tensor, got {size:?}"
                )))
            }
        };
        let flat = t
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_flatten(0, -1)?;
        let data: Vec<f32> = Vec::try_from(&flat)?;
        Ok(Self {
            width: w,
            height: h,
            data: data
                .into_iter()
                .map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0))
                .collect(),
        })
    }

    /// To a CPU tensor `f32 [1, H, W]` with values in `[-1, 1]`.
    pub fn to_tensor(&self) -> Tensor {
        let scaled: Vec<f32> = self.data.iter().map(|v| v * 2.0 - 1.0).collect();
        Tensor::from_slice(&scaled).view([1, self.height as i64, self.width as i64])
    }

    fn binary(&self, threshold: f32) -> Vec<bool> {
        self.data.iter().map(|&v| v > threshold).collect()
    }

    fn from_binary(width: usize, height: usize, mask: &[bool]) -> Self {
        Self {
            width,
            height,
            data: mask.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect(),
        }
    }
}

/// The kinds of condition map the crate can extract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConditionKind {
    /// Canny edges ([`canny`] with [`CANNY_LOW`], [`CANNY_HIGH`], σ = [`CANNY_SIGMA`]).
    Edges,
    /// Binary foreground mask ([`foreground_mask`] at [`MASK_THRESHOLD`], small holes filled
    /// with [`fill_small_holes`] up to [`MAX_HOLE_AREA`]).
    Mask,
    /// Distance-to-background map of the mask ([`depth_like`]).
    Depth,
    /// Blocky low-resolution copy ([`low_resolution`] with factor [`LOW_RES_FACTOR`]).
    LowRes,
    /// Skeleton of the mask with keypoint dots ([`skeleton`], rendered by [`Skeleton::render`]).
    Skeleton,
    /// The object's position: a Gaussian heatmap ([`TRAJECTORY_SIGMA`]) at the centre of brightness
    /// ([`trajectory_heatmap`]). Made for Moving Fashion-MNIST clips (one item on a black canvas), where
    /// per-frame heatmaps trace the item's trajectory; not in [`ConditionKind::ALL`] (on centred
    /// still images every position is the same).
    Trajectory,
    /// A condition image supplied with the data (an imagefolder's `conditioning_image`, e.g. for a
    /// Stable Diffusion ControlNet): nothing is extracted and it has no fidelity metric of its own (a run
    /// scores it as the kind its `given_kind` names). Not in [`ConditionKind::ALL`].
    Given,
}

impl ConditionKind {
    /// All kinds, in a fixed order.
    pub const ALL: [ConditionKind; 5] = [
        ConditionKind::Edges,
        ConditionKind::Mask,
        ConditionKind::Depth,
        ConditionKind::LowRes,
        ConditionKind::Skeleton,
    ];

    /// The name used on the command line and in configs.
    pub fn name(&self) -> &'static str {
        match self {
            ConditionKind::Edges => "edges",
            ConditionKind::Mask => "mask",
            ConditionKind::Depth => "depth",
            ConditionKind::LowRes => "lowres",
            ConditionKind::Skeleton => "skeleton",
            ConditionKind::Trajectory => "trajectory",
            ConditionKind::Given => "given",
        }
    }

    /// The condition map of `img` with this kind's default parameters; values in `[0, 1]`.
    pub fn extract(&self, img: &GrayImage) -> GrayImage {
        match self {
            ConditionKind::Edges => canny(img, CANNY_LOW, CANNY_HIGH),
            ConditionKind::Mask => {
                GrayImage::from_binary(img.width, img.height, &default_mask(img))
            }
            ConditionKind::Depth => depth_like(img),
            ConditionKind::LowRes => low_resolution(img, LOW_RES_FACTOR),
            ConditionKind::Skeleton => skeleton(img).render(),
            ConditionKind::Trajectory => trajectory_heatmap(img, TRAJECTORY_SIGMA),
            ConditionKind::Given => img.clone(),
        }
    }
}

impl fmt::Display for ConditionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ConditionKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        for k in [ConditionKind::Given, ConditionKind::Trajectory] {
            if s == k.name() {
                return Ok(k);
            }
        }
        ConditionKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            Error::Config(format!(
                "unknown condition kind {s:?}: expected one of edges, mask, depth, lowres, skeleton, trajectory"
            ))
        })
    }
}

/// The luminance of colour images `[N, 3, H, W]` (ITU-R BT.601 weights 0.299, 0.587, 0.114), `[N, 1, H, W]`:
/// what the condition extractors see of a colour image. The weights sum to 1, so the range is kept
/// (`[-1, 1]` images, `[0, 1]` condition images alike). Other channel counts are refused.
pub fn luminance(images: &Tensor) -> Result<Tensor> {
    let size = images.size();
    if size.len() != 4 || size[1] != 3 {
        return Err(Error::Config(format!("luminance: expected colour images [N, 3, H, W], got {size:?}")));
    }
    let w = Tensor::from_slice(&[0.299f32, 0.587, 0.114])
        .to_device(images.device())
        .to_kind(images.kind())
        .view([1, 3, 1, 1]);
    Ok(images.f_mul(&w)?.f_sum_dim_intlist(1, true, images.kind())?)
}

/// Extracts `kind` from every image of a batch `[N, C, H, W]` in `[-1, 1]`, each channel on its own
/// (grey images have one; a Moving Fashion-MNIST clip has one per frame); returns `f32 [N, C, H, W]`
/// in `[0, 1]` on the input's device.
pub fn extract_batch(kind: ConditionKind, images: &Tensor) -> Result<Tensor> {
    let size = images.size();
    let [n, c, h, w] = size.as_slice() else {
        return Err(Error::Config(format!(
            "expected a [N, C, H, W] image batch, got {size:?}"
        )));
    };
    let (frames, n, h, w) = (*c, (*n * *c) as usize, *h as usize, *w as usize);
    let flat: Vec<f32> = Vec::try_from(
        &images
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_flatten(0, -1)?,
    )?;
    let mut out = Vec::with_capacity(flat.len());
    for i in 0..n {
        let data = flat[i * h * w..(i + 1) * h * w]
            .iter()
            .map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0))
            .collect();
        out.extend(
            kind.extract(&GrayImage {
                width: w,
                height: h,
                data,
            })
            .data,
        );
    }
    Ok(Tensor::from_slice(&out)
        .view([n as i64 / frames.max(1), frames, h as i64, w as i64])
        .to_device(images.device()))
}

/// One condition or several stacked as channels (`edges+mask`): what a side network is fed. A stacked
/// side network is trained with random condition dropout (`condition_dropout`), so that at inference
/// any subset of its conditions can be given, the others left at zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConditionSet(Vec<ConditionKind>);

impl ConditionSet {
    /// The set of `kinds` (at least one, none repeated), in channel order.
    pub fn new(kinds: Vec<ConditionKind>) -> Result<Self> {
        if kinds.is_empty() {
            return Err(Error::Config("a condition set needs at least one condition".into()));
        }
        for (i, k) in kinds.iter().enumerate() {
            if kinds[..i].contains(k) {
                return Err(Error::Config(format!("condition {k} appears twice in the condition set")));
            }
        }
        Ok(Self(kinds))
    }

    /// The conditions, in channel order.
    pub fn kinds(&self) -> &[ConditionKind] {
        &self.0
    }

    /// The first condition: the one scored while training (its metric names the fidelity curve).
    pub fn primary(&self) -> ConditionKind {
        self.0[0]
    }

    /// How many conditions (= the side network's `conditioning_channels`).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a set has at least one condition.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The channel of `kind`, if the set has it.
    pub fn channel(&self, kind: ConditionKind) -> Option<i64> {
        self.0.iter().position(|k| *k == kind).map(|i| i as i64)
    }

    /// Every condition of the set extracted from `images` ([N, F, H, W] in [-1, 1]: F = 1 for a grey
    /// image, one channel per frame for a clip), frame-major: channel `f·len + k` holds condition `k` of
    /// frame `f`; [N, F·len, H, W] in [0, 1]. (For an image: the conditions in set order.)
    pub fn extract_batch(&self, images: &Tensor) -> Result<Tensor> {
        let maps: Vec<Tensor> = self.0.iter().map(|k| extract_batch(*k, images)).collect::<Result<_>>()?;
        let s = maps[0].size();
        Ok(Tensor::f_stack(&maps, 2)?.f_reshape([s[0], s[1] * self.0.len() as i64, s[2], s[3]])?)
    }

    /// Every condition of the set extracted from colour images `[N, 3, H, W]` in [-1, 1], as a side network on
    /// colour data takes them: from their [`luminance`], except `lowres`, which keeps the colour (3 channels,
    /// [N, 3, H, W]; it cannot be stacked with other conditions then).
    pub fn extract_colour_batch(&self, images: &Tensor) -> Result<Tensor> {
        match self.0.as_slice() {
            [ConditionKind::LowRes] => {
                if images.size().get(1) != Some(&3) {
                    return Err(Error::Config(format!(
                        "expected colour images [N, 3, H, W], got {:?}",
                        images.size()
                    )));
                }
                self.extract_batch(images)
            }
            kinds if kinds.contains(&ConditionKind::LowRes) => Err(Error::Config(format!(
                "condition {self}: on colour images lowres keeps the colour (3 channels) and cannot be stacked with \
                 other conditions; train lowres on its own, or set data.channels = 1"
            ))),
            _ => self.extract_batch(&luminance(images)?),
        }
    }

    /// The channels of condition `kind` in `conditions` laid out as [`ConditionSet::extract_batch`]
    /// returns them: [N, F, H, W], one per frame.
    pub fn channels_of(&self, conditions: &Tensor, kind: ConditionKind) -> Result<Tensor> {
        let k = self.channel(kind).ok_or_else(|| Error::Config(format!("the condition set {self} has no {kind}")))?;
        let s = conditions.size();
        let len = self.0.len() as i64;
        if s.len() != 4 || s[1] % len != 0 {
            return Err(Error::Config(format!("{s:?} is not a batch of {self} conditions")));
        }
        Ok(conditions.f_reshape([s[0], s[1] / len, len, s[2], s[3]])?.f_select(2, k)?)
    }
}

impl From<ConditionKind> for ConditionSet {
    fn from(kind: ConditionKind) -> Self {
        Self(vec![kind])
    }
}

impl fmt::Display for ConditionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|k| k.name()).collect();
        f.write_str(&names.join("+"))
    }
}

impl FromStr for ConditionSet {
    type Err = Error;
    /// `edges`, or several kinds joined by `+` (`edges+mask`).
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s.split('+').map(|k| k.trim().parse()).collect::<Result<_>>()?)
    }
}

/// Separable Gaussian blur with standard deviation `sigma` (borders replicate the edge pixel).
pub fn gaussian_blur(img: &GrayImage, sigma: f32) -> GrayImage {
    if sigma <= 0.0 || img.data.is_empty() {
        return img.clone();
    }
    let r = (3.0 * sigma).ceil() as isize;
    let mut kernel: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= sum);
    let (w, h) = (img.width, img.height);
    let horiz = GrayImage::from_fn(w, h, |x, y| {
        (-r..=r)
            .zip(&kernel)
            .map(|(d, k)| k * img.clamped(x as isize + d, y as isize))
            .sum()
    });
    GrayImage::from_fn(w, h, |x, y| {
        (-r..=r)
            .zip(&kernel)
            .map(|(d, k)| k * horiz.clamped(x as isize, y as isize + d))
            .sum()
    })
}

/// Canny edges with the default blur σ = [`CANNY_SIGMA`]; see [`canny_with_sigma`].
pub fn canny(img: &GrayImage, low: f32, high: f32) -> GrayImage {
    canny_with_sigma(img, CANNY_SIGMA, low, high)
}

/// Canny edge detector: Gaussian blur (`sigma`), Sobel gradients (scaled by 1/8 so that the
/// magnitude is in intensity units per pixel), non-maximum suppression along the quantised
/// gradient direction, then double threshold with hysteresis (pixels above `high` seed edges,
/// 8-connected pixels above `low` extend them). Output is binary: 1 on edges, 0 elsewhere.
pub fn canny_with_sigma(img: &GrayImage, sigma: f32, low: f32, high: f32) -> GrayImage {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        return img.clone();
    }
    let b = gaussian_blur(img, sigma);
    let mut mag = vec![0f32; w * h];
    let mut dir = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let p = |dx: isize, dy: isize| b.clamped(x as isize + dx, y as isize + dy);
            let gx =
                (p(1, -1) + 2.0 * p(1, 0) + p(1, 1) - p(-1, -1) - 2.0 * p(-1, 0) - p(-1, 1)) / 8.0;
            let gy =
                (p(-1, 1) + 2.0 * p(0, 1) + p(1, 1) - p(-1, -1) - 2.0 * p(0, -1) - p(1, -1)) / 8.0;
            mag[y * w + x] = (gx * gx + gy * gy).sqrt();
            // Quantise the gradient direction to 0°, 45°, 90°, 135° (y grows downwards).
            let angle = gy.atan2(gx).to_degrees().rem_euclid(180.0);
            dir[y * w + x] = match angle {
                a if !(22.5..157.5).contains(&a) => 0,
                a if a < 67.5 => 1,
                a if a < 112.5 => 2,
                _ => 3,
            };
        }
    }
    let m = |x: isize, y: isize| {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0.0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    let mut thin = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (x as isize, y as isize);
            let (dx, dy) = match dir[y * w + x] {
                0 => (1, 0),
                1 => (1, 1),
                2 => (0, 1),
                _ => (-1, 1),
            };
            let v = mag[y * w + x];
            // Strict on one side, non-strict on the other: a two-pixel plateau (a step falling
            // exactly between pixels) keeps exactly one of its pixels.
            if v > m(xi - dx, yi - dy) && v >= m(xi + dx, yi + dy) {
                thin[y * w + x] = v;
            }
        }
    }
    let mut edge = vec![false; w * h];
    let mut stack: Vec<usize> = (0..w * h).filter(|&i| thin[i] >= high).collect();
    for &i in &stack {
        edge[i] = true;
    }
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for (nx, ny) in neighbours8(x, y) {
            if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if !edge[j] && thin[j] >= low {
                edge[j] = true;
                stack.push(j);
            }
        }
    }
    GrayImage::from_binary(w, h, &edge)
}

fn neighbours8(x: isize, y: isize) -> [(isize, isize); 8] {
    [
        (x - 1, y - 1),
        (x, y - 1),
        (x + 1, y - 1),
        (x - 1, y),
        (x + 1, y),
        (x - 1, y + 1),
        (x, y + 1),
        (x + 1, y + 1),
    ]
}

/// Binary foreground mask: 1 where the value is strictly above `threshold`, else 0.
pub fn foreground_mask(img: &GrayImage, threshold: f32) -> GrayImage {
    GrayImage::from_binary(img.width, img.height, &img.binary(threshold))
}

/// Fills the enclosed background regions (4-connected, not touching the image border) of at most
/// `max_area` pixels.
pub fn fill_small_holes(width: usize, height: usize, mask: &[bool], max_area: usize) -> Vec<bool> {
    let mut out = mask.to_vec();
    let mut seen = mask.to_vec();
    let mut stack = Vec::new();
    for start in 0..width * height {
        if seen[start] {
            continue;
        }
        // Flood one background component, noting whether it reaches the border.
        seen[start] = true;
        stack.push(start);
        let mut component = Vec::new();
        let mut touches_border = false;
        while let Some(i) = stack.pop() {
            component.push(i);
            let (x, y) = (i % width, i / width);
            touches_border |= x == 0 || y == 0 || x + 1 == width || y + 1 == height;
            let mut visit = |j: usize| {
                if !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < width {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - width);
            }
            if y + 1 < height {
                visit(i + width);
            }
        }
        if !touches_border && component.len() <= max_area {
            for i in component {
                out[i] = true;
            }
        }
    }
    out
}

/// The mask used by the default extractors: threshold at [`MASK_THRESHOLD`], then fill holes of at
/// most [`MAX_HOLE_AREA`] pixels.
fn default_mask(img: &GrayImage) -> Vec<bool> {
    fill_small_holes(
        img.width,
        img.height,
        &img.binary(MASK_THRESHOLD),
        MAX_HOLE_AREA,
    )
}

/// Exact Euclidean distance from each pixel of `mask` to the nearest background pixel, treating
/// everything outside the image as background (so objects touching the border still fade out).
/// Background pixels get 0. Felzenszwalb–Huttenlocher's separable squared-distance transform.
pub fn distance_transform(width: usize, height: usize, mask: &[bool]) -> Vec<f32> {
    // Work on a copy padded by one background pixel on each side.
    let (pw, ph) = (width + 2, height + 2);
    const INF: f64 = 1e20;
    let mut f = vec![0f64; pw * ph];
    for y in 0..height {
        for x in 0..width {
            if mask[y * width + x] {
                f[(y + 1) * pw + x + 1] = INF;
            }
        }
    }
    let mut col = vec![0f64; ph];
    for x in 0..pw {
        for y in 0..ph {
            col[y] = f[y * pw + x];
        }
        let d = dt1d(&col);
        for y in 0..ph {
            f[y * pw + x] = d[y];
        }
    }
    for y in 0..ph {
        let d = dt1d(&f[y * pw..(y + 1) * pw]);
        f[y * pw..(y + 1) * pw].copy_from_slice(&d);
    }
    let mut out = vec![0f32; width * height];
    for y in 0..height {
        for x in 0..width {
            out[y * width + x] = f[(y + 1) * pw + x + 1].sqrt() as f32;
        }
    }
    out
}

/// 1-D squared distance transform of a sampled function (lower envelope of parabolas).
fn dt1d(f: &[f64]) -> Vec<f64> {
    let n = f.len();
    let mut d = vec![0f64; n];
    let mut v = vec![0usize; n];
    let mut z = vec![0f64; n + 1];
    let mut k = 0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    let inter = |q: usize, p: usize| {
        ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * q as f64 - 2.0 * p as f64)
    };
    for q in 1..n {
        let mut s = inter(q, v[k]);
        while s <= z[k] {
            k -= 1;
            s = inter(q, v[k]);
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    k = 0;
    for (q, dq) in d.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let diff = q as f64 - v[k] as f64;
        *dq = diff * diff + f[v[k]];
    }
    d
}

/// A depth-like map: the Euclidean distance transform of the default foreground mask (threshold
/// [`MASK_THRESHOLD`], small holes filled), divided by its maximum so it peaks at 1 deep inside the object; 0 on the
/// background and everywhere when there is no foreground.
pub fn depth_like(img: &GrayImage) -> GrayImage {
    let mask = default_mask(img);
    let dist = distance_transform(img.width, img.height, &mask);
    let max = dist.iter().cloned().fold(0f32, f32::max);
    let data = if max > 0.0 {
        dist.iter().map(|d| d / max).collect()
    } else {
        dist
    };
    GrayImage {
        width: img.width,
        height: img.height,
        data,
    }
}

/// Area-average down by `factor` (partial blocks at the right/bottom average what they cover),
/// then nearest-neighbour back up to the original size. `factor` 0 or 1 returns a copy.
pub fn low_resolution(img: &GrayImage, factor: usize) -> GrayImage {
    if factor <= 1 {
        return img.clone();
    }
    let (w, h) = (img.width, img.height);
    let (bw, bh) = (w.div_ceil(factor), h.div_ceil(factor));
    let mut blocks = vec![0f32; bw * bh];
    for by in 0..bh {
        for bx in 0..bw {
            let (mut sum, mut count) = (0f64, 0usize);
            for y in by * factor..((by + 1) * factor).min(h) {
                for x in bx * factor..((bx + 1) * factor).min(w) {
                    sum += img.get(x, y) as f64;
                    count += 1;
                }
            }
            blocks[by * bw + bx] = (sum / count as f64) as f32;
        }
    }
    GrayImage::from_fn(w, h, |x, y| blocks[(y / factor) * bw + x / factor])
}

/// The centre of brightness `(x, y)` of `img` in pixels (pixel `i` spans `[i, i+1)`); the image
/// centre for a black image.
pub fn brightness_centre(img: &GrayImage) -> (f32, f32) {
    let (mut total, mut mx, mut my) = (0f64, 0f64, 0f64);
    for y in 0..img.height {
        for x in 0..img.width {
            let v = img.get(x, y) as f64;
            total += v;
            mx += v * (x as f64 + 0.5);
            my += v * (y as f64 + 0.5);
        }
    }
    if total <= 1e-6 {
        return (img.width as f32 / 2.0, img.height as f32 / 2.0);
    }
    ((mx / total) as f32, (my / total) as f32)
}

/// A unit-peak Gaussian heatmap of width `sigma` at the [`brightness_centre`] of `img`.
pub fn trajectory_heatmap(img: &GrayImage, sigma: f32) -> GrayImage {
    let (cx, cy) = brightness_centre(img);
    GrayImage::from_fn(img.width, img.height, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp()
    })
}

/// Whether a skeleton point ends a line or joins several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeypointKind {
    /// A skeleton pixel with exactly one skeleton neighbour.
    Endpoint,
    /// A skeleton pixel where three or more branches meet.
    Junction,
}

/// A skeleton keypoint at column `x`, row `y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Keypoint {
    /// Column.
    pub x: usize,
    /// Row.
    pub y: usize,
    /// Endpoint or junction.
    pub kind: KeypointKind,
}

/// The skeleton of an image's foreground and its keypoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Skeleton {
    /// Binary map: 1 on the one-pixel-wide skeleton.
    pub map: GrayImage,
    /// Endpoints and junctions, in raster order.
    pub keypoints: Vec<Keypoint>,
}

impl Skeleton {
    /// The skeleton with a 3×3 dot drawn on every keypoint (the condition image).
    pub fn render(&self) -> GrayImage {
        let mut out = self.map.clone();
        let (w, h) = (out.width as isize, out.height as isize);
        for k in &self.keypoints {
            for (x, y) in neighbours8(k.x as isize, k.y as isize) {
                if x >= 0 && y >= 0 && x < w && y < h {
                    out.set(x as usize, y as usize, 1.0);
                }
            }
        }
        out
    }
}

/// Zhang–Suen thinning of the default foreground mask (threshold [`MASK_THRESHOLD`], small holes
/// filled), plus its keypoints:
/// endpoints (one 8-neighbour) and junctions (three or more branches around the pixel; adjacent
/// junction pixels are merged into the first in raster order).
pub fn skeleton(img: &GrayImage) -> Skeleton {
    let (w, h) = (img.width, img.height);
    let mut m = default_mask(img);
    let at = |m: &[bool], x: isize, y: isize| {
        x >= 0 && y >= 0 && x < w as isize && y < h as isize && m[y as usize * w + x as usize]
    };
    // P2..P9 clockwise from north, as in Zhang & Suen (1984).
    let ring = |m: &[bool], x: usize, y: usize| {
        let (x, y) = (x as isize, y as isize);
        [
            at(m, x, y - 1),
            at(m, x + 1, y - 1),
            at(m, x + 1, y),
            at(m, x + 1, y + 1),
            at(m, x, y + 1),
            at(m, x - 1, y + 1),
            at(m, x - 1, y),
            at(m, x - 1, y - 1),
        ]
    };
    let transitions = |p: &[bool; 8]| (0..8).filter(|&i| !p[i] && p[(i + 1) % 8]).count();
    loop {
        let mut changed = false;
        for step in 0..2 {
            let mut remove = Vec::new();
            for y in 0..h {
                for x in 0..w {
                    if !m[y * w + x] {
                        continue;
                    }
                    let p = ring(&m, x, y);
                    let b = p.iter().filter(|&&v| v).count();
                    let [p2, _, p4, _, p6, _, p8, _] = p;
                    // Step 1 needs P2·P4·P6 = 0 and P4·P6·P8 = 0; step 2 needs P2·P4·P8 = 0 and P2·P6·P8 = 0.
                    let cond = if step == 0 {
                        !(p4 && p6 && (p2 || p8))
                    } else {
                        !(p2 && p8 && (p4 || p6))
                    };
                    if (2..=6).contains(&b) && transitions(&p) == 1 && cond {
                        remove.push(y * w + x);
                    }
                }
            }
            changed |= !remove.is_empty();
            for i in remove {
                m[i] = false;
            }
        }
        if !changed {
            break;
        }
    }
    let mut keypoints: Vec<Keypoint> = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if !m[y * w + x] {
                continue;
            }
            let p = ring(&m, x, y);
            let count = p.iter().filter(|&&v| v).count();
            let kind = if count == 1 {
                KeypointKind::Endpoint
            } else if transitions(&p) >= 3 {
                let near = keypoints.iter().any(|k| {
                    k.kind == KeypointKind::Junction && k.x.abs_diff(x) <= 1 && k.y.abs_diff(y) <= 1
                });
                if near {
                    continue;
                }
                KeypointKind::Junction
            } else {
                continue;
            };
            keypoints.push(Keypoint { x, y, kind });
        }
    }
    Skeleton {
        map: GrayImage::from_binary(w, h, &m),
        keypoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_images_give_lowres_in_colour_and_other_conditions_from_their_luminance() {
        let grey = rect(4, 20, 6, 28).to_tensor().view([1, 1, 32, 32]) * 2.0 - 1.0;
        let colour = Tensor::cat(&[&grey, &(&grey * 0.5), &(-&grey)], 1);
        let lowres = ConditionSet::from(ConditionKind::LowRes).extract_colour_batch(&colour).unwrap();
        assert_eq!(lowres.size(), [1, 3, 32, 32]);
        for c in 0..3 {
            let one = extract_batch(ConditionKind::LowRes, &colour.narrow(1, c, 1)).unwrap();
            assert!(lowres.narrow(1, c, 1).equal(&one), "colour {c}");
        }
        let edges = ConditionSet::from(ConditionKind::Edges).extract_colour_batch(&colour).unwrap();
        assert!(edges.equal(&extract_batch(ConditionKind::Edges, &luminance(&colour).unwrap()).unwrap()));
        let stacked = ConditionSet::new(vec![ConditionKind::Edges, ConditionKind::LowRes]).unwrap();
        let e = stacked.extract_colour_batch(&colour).unwrap_err().to_string();
        assert!(e.contains("cannot be stacked") && !e.contains('\n'), "{e}");
        assert!(ConditionSet::from(ConditionKind::LowRes).extract_colour_batch(&grey).is_err());
    }

    /// A 32×32 black image with a white filled rectangle over columns `x0..x1`, rows `y0..y1`.
    fn rect(x0: usize, x1: usize, y0: usize, y1: usize) -> GrayImage {
        GrayImage::from_fn(32, 32, |x, y| {
            if (x0..x1).contains(&x) && (y0..y1).contains(&y) {
                1.0
            } else {
                0.0
            }
        })
    }

    #[test]
    fn canny_of_rectangle_is_its_border() {
        let (x0, x1, y0, y1) = (8, 24, 10, 22);
        let img = rect(x0, x1, y0, y1);
        let e = ConditionKind::Edges.extract(&img);
        // Distance (Chebyshev) from a pixel to the rectangle's inner boundary ring.
        let ring = |x: usize, y: usize| {
            let inside = (x0..x1).contains(&x) && (y0..y1).contains(&y);
            inside && (x == x0 || x == x1 - 1 || y == y0 || y == y1 - 1)
        };
        let near_ring = |x: usize, y: usize| {
            (x.saturating_sub(1)..=(x + 1).min(31))
                .any(|a| (y.saturating_sub(1)..=(y + 1).min(31)).any(|b| ring(a, b)))
        };
        let mut edges = 0;
        for y in 0..32 {
            for x in 0..32 {
                let v = e.get(x, y);
                assert!(v == 0.0 || v == 1.0, "binary output");
                if v == 1.0 {
                    edges += 1;
                    assert!(near_ring(x, y), "edge at ({x}, {y}) is not on the border");
                }
            }
        }
        // Every side is found: along each side's middle stretch there is an edge within 1 pixel.
        for x in x0 + 2..x1 - 2 {
            assert!(
                (y0 - 1..=y0).any(|y| e.get(x, y) == 1.0)
                    && (y1 - 1..=y1).any(|y| e.get(x, y) == 1.0)
            );
        }
        for y in y0 + 2..y1 - 2 {
            assert!(
                (x0 - 1..=x0).any(|x| e.get(x, y) == 1.0)
                    && (x1 - 1..=x1).any(|x| e.get(x, y) == 1.0)
            );
        }
        assert!(
            edges < 2 * ((x1 - x0) + (y1 - y0)) + 8,
            "{edges} edge pixels: outline is not thin"
        );
    }

    #[test]
    fn mask_of_rectangle_is_the_rectangle() {
        let img = rect(3, 20, 5, 9);
        assert_eq!(foreground_mask(&img, 0.5), img);
        assert_eq!(ConditionKind::Mask.extract(&img), img);
    }

    #[test]
    fn small_holes_are_filled_large_ones_kept() {
        // A ring 12×12 with a 2×2 hole and a separate frame with a 6×6 hole.
        let img = GrayImage::from_fn(32, 32, |x, y| {
            let a = (2..14).contains(&x)
                && (2..14).contains(&y)
                && !((7..9).contains(&x) && (7..9).contains(&y));
            let b = (16..30).contains(&x)
                && (16..30).contains(&y)
                && !((20..26).contains(&x) && (20..26).contains(&y));
            if a || b {
                1.0
            } else {
                0.0
            }
        });
        let m = ConditionKind::Mask.extract(&img);
        assert_eq!(m.get(7, 7), 1.0);
        assert_eq!(m.get(22, 22), 0.0);
        assert_eq!(m.get(0, 0), 0.0);
        assert_eq!(foreground_mask(&img, 0.5).get(7, 7), 0.0);
    }

    #[test]
    fn depth_of_square_peaks_at_centre() {
        let img = rect(10, 21, 10, 21); // 11×11, centre (15, 15)
        let d = depth_like(&img);
        assert_eq!(d.get(15, 15), 1.0);
        assert!(d.data.iter().all(|v| (0.0..=1.0).contains(v)));
        for y in 0..32 {
            for x in 0..32 {
                if img.get(x, y) == 0.0 {
                    assert_eq!(d.get(x, y), 0.0);
                } else {
                    assert!(d.get(x, y) > 0.0);
                }
            }
        }
        // Non-decreasing from each side towards the centre, along the centre row and column.
        for i in 10..15 {
            assert!(d.get(i, 15) < d.get(i + 1, 15));
            assert!(d.get(15, i) < d.get(15, i + 1));
            assert!(d.get(30 - i, 15) < d.get(30 - i - 1, 15));
            assert!(d.get(i, i) < d.get(i + 1, i + 1));
        }
    }

    #[test]
    fn distance_transform_is_euclidean() {
        // One background pixel in the middle of an all-foreground 9×9 image; the padding ring
        // outside the image is background too.
        let mut mask = vec![true; 81];
        mask[4 * 9 + 4] = false;
        let d = distance_transform(9, 9, &mask);
        assert_eq!(d[4 * 9 + 4], 0.0);
        assert_eq!(d[4 * 9 + 6], 2.0);
        assert!((d[6 * 9 + 6] - 8f32.sqrt()).abs() < 1e-6);
        assert_eq!(d[0], 1.0);
    }

    #[test]
    fn low_resolution_keeps_constants_and_blocky_images() {
        let c = GrayImage::from_fn(30, 30, |_, _| 0.3);
        let l = low_resolution(&c, 4);
        assert!(l.data.iter().all(|&v| (v - 0.3).abs() < 1e-7));
        let checker = GrayImage::from_fn(32, 32, |x, y| ((x / 4 + y / 4) % 2) as f32);
        assert_eq!(low_resolution(&checker, 4), checker);
        let fine = GrayImage::from_fn(8, 8, |x, y| ((x + y) % 2) as f32);
        assert!(low_resolution(&fine, 4).data.iter().all(|&v| v == 0.5));
    }

    #[test]
    fn skeleton_of_bar_is_a_line_with_two_endpoints() {
        let img = rect(4, 28, 13, 18); // 24 wide, 5 thick, rows 13..18
        let s = skeleton(&img);
        let on: Vec<(usize, usize)> = (0..32)
            .flat_map(|y| (0..32).map(move |x| (x, y)))
            .filter(|&(x, y)| s.map.get(x, y) == 1.0)
            .collect();
        assert!(!on.is_empty());
        assert!(
            on.iter().all(|&(_, y)| y == on[0].1),
            "not one horizontal line: {on:?}"
        );
        assert_eq!(on[0].1, 15);
        let xs: Vec<usize> = on.iter().map(|p| p.0).collect();
        assert!(
            xs.windows(2).all(|w| w[1] == w[0] + 1),
            "line has gaps: {xs:?}"
        );
        assert!(xs.len() >= 16, "line too short: {xs:?}");
        let ends: Vec<_> = s
            .keypoints
            .iter()
            .filter(|k| k.kind == KeypointKind::Endpoint)
            .collect();
        assert_eq!(ends.len(), 2, "{:?}", s.keypoints);
        assert_eq!(s.keypoints.len(), 2);
        assert_eq!((ends[0].x, ends[1].x), (xs[0], *xs.last().unwrap()));
        let r = s.render();
        assert_eq!(r.get(xs[0], 14), 1.0); // dot around the endpoint
        assert_eq!(r.get(xs[5], 14), 0.0);
    }

    #[test]
    fn skeleton_of_cross_has_a_junction() {
        let img = GrayImage::from_fn(32, 32, |x, y| {
            if (14..17).contains(&x) || (14..17).contains(&y) {
                1.0
            } else {
                0.0
            }
        });
        let img = GrayImage::from_fn(32, 32, |x, y| {
            if (3..29).contains(&x) && (3..29).contains(&y) {
                img.get(x, y)
            } else {
                0.0
            }
        });
        let s = skeleton(&img);
        assert_eq!(
            s.keypoints
                .iter()
                .filter(|k| k.kind == KeypointKind::Junction)
                .count(),
            1,
            "{:?}",
            s.keypoints
        );
        assert_eq!(
            s.keypoints
                .iter()
                .filter(|k| k.kind == KeypointKind::Endpoint)
                .count(),
            4,
            "{:?}",
            s.keypoints
        );
    }

    #[test]
    fn extractors_are_deterministic_and_in_range() {
        let img = GrayImage::from_fn(32, 32, |x, y| {
            let (dx, dy) = (x as f32 - 15.5, y as f32 - 14.0);
            if dx * dx / 120.0 + dy * dy / 60.0 < 1.0 {
                0.4 + 0.5 * ((x * 7 + y * 3) % 5) as f32 / 4.0
            } else {
                0.0
            }
        });
        for k in ConditionKind::ALL {
            let a = k.extract(&img);
            let b = k.extract(&img.clone());
            assert_eq!(
                a.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)), "{k}");
            assert_eq!(k.to_string().parse::<ConditionKind>().unwrap(), k);
        }
        assert!("sketch".parse::<ConditionKind>().is_err());
    }

    #[test]
    fn condition_sets_parse_print_and_stack() {
        let set: ConditionSet = "edges+mask".parse().unwrap();
        assert_eq!(set.kinds(), &[ConditionKind::Edges, ConditionKind::Mask]);
        assert_eq!(set.to_string(), "edges+mask");
        assert_eq!(set.primary(), ConditionKind::Edges);
        assert_eq!(set.channel(ConditionKind::Mask), Some(1));
        assert_eq!(set.channel(ConditionKind::Depth), None);
        assert_eq!("depth".parse::<ConditionSet>().unwrap(), ConditionSet::from(ConditionKind::Depth));
        for bad in ["", "edges+", "edges+edges", "edges+fog"] {
            assert!(bad.parse::<ConditionSet>().is_err(), "{bad:?} parsed");
        }
        // A bright 4×4 square on a dark 8×8 background: both edges and mask are non-trivial.
        let px: Vec<f32> =
            (0..64).map(|i| if (2..6).contains(&(i / 8)) && (2..6).contains(&(i % 8)) { 1.0 } else { -1.0 }).collect();
        let img = Tensor::from_slice(&px).view([1, 1, 8, 8]);
        let stacked = set.extract_batch(&img).unwrap();
        assert_eq!(stacked.size(), [1, 2, 8, 8]);
        assert!(stacked.narrow(1, 0, 1).equal(&extract_batch(ConditionKind::Edges, &img).unwrap()));
        assert!(stacked.narrow(1, 1, 1).equal(&extract_batch(ConditionKind::Mask, &img).unwrap()));
    }

    #[test]
    fn tensor_conversions_and_batch() {
        let img = rect(8, 24, 10, 22);
        let t = img.to_tensor();
        assert_eq!(t.size(), [1, 32, 32]);
        assert_eq!(t.double_value(&[0, 0, 0]), -1.0);
        assert_eq!(GrayImage::from_tensor(&t).unwrap(), img);
        let batch = Tensor::stack(&[t.shallow_clone(), rect(1, 5, 1, 5).to_tensor()], 0);
        let out = extract_batch(ConditionKind::Mask, &batch).unwrap();
        assert_eq!(out.size(), [2, 1, 32, 32]);
        assert_eq!(
            GrayImage::from_tensor(&(out.get(0) * 2.0 - 1.0)).unwrap(),
            img
        );
        assert!(extract_batch(ConditionKind::Mask, &t).is_err());
    }
}

#[cfg(test)]
mod preview {
    use super::*;
    use crate::data::fashion_mnist::{load_raw, Source, Split};

    /// Writes `target/condition-preview.png`: 20 embedded Fashion-MNIST test images (2 per class),
    /// one per row, followed by their edges, mask, depth, low-res and skeleton maps, for eyeballing
    /// the default parameters: `cargo test --lib condition_preview -- --ignored`.
    #[test]
    #[ignore]
    fn condition_preview() {
        let (imgs, labels) = load_raw(&Source::Embedded, Split::Test).unwrap();
        let picks: Vec<usize> = (0..10u8)
            .flat_map(|c| {
                labels
                    .iter()
                    .enumerate()
                    .filter(move |(_, &l)| l == c)
                    .map(|(i, _)| i)
                    .take(2)
            })
            .collect();
        let (s, cols) = (32usize, 1 + ConditionKind::ALL.len());
        let mut out = image::GrayImage::new((s * cols) as u32, (s * picks.len()) as u32);
        let mut edge_frac = 0.0;
        for (row, &i) in picks.iter().enumerate() {
            let mut g = GrayImage::new(s, s);
            for (p, &v) in imgs.image(i).iter().enumerate() {
                g.set(p % 28 + 2, p / 28 + 2, v as f32 / 255.0);
            }
            let maps: Vec<GrayImage> = std::iter::once(g.clone())
                .chain(ConditionKind::ALL.iter().map(|k| k.extract(&g)))
                .collect();
            edge_frac +=
                maps[1].data.iter().sum::<f32>() / maps[2].data.iter().sum::<f32>().max(1.0);
            for (c, m) in maps.iter().enumerate() {
                for y in 0..s {
                    for x in 0..s {
                        out.put_pixel(
                            (c * s + x) as u32,
                            (row * s + y) as u32,
                            image::Luma([(m.get(x, y) * 255.0).round() as u8]),
                        );
                    }
                }
            }
        }
        eprintln!(
            "mean edge pixels / mask pixels: {:.3}",
            edge_frac / picks.len() as f32
        );
        let big = image::imageops::resize(
            &out,
            out.width() * 3,
            out.height() * 3,
            image::imageops::FilterType::Nearest,
        );
        big.save(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/condition-preview.png"
        ))
        .unwrap();
    }
}
