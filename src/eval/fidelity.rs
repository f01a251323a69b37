//! Control fidelity: how well generated samples obey the condition they were generated from.
//!
//! A sample is scored by re-extracting the condition from it, with exactly the extractor and default parameters
//! of [`ConditionKind::extract`] (so a ground-truth image scored against its own condition gets the perfect
//! score), and comparing that with the condition it was generated from. Samples are mapped from `[-1, 1]` to
//! `[0, 1]` and clamped first, as [`extract_batch`](crate::data::conditions::extract_batch) does. One metric per
//! kind:
//!
//! | kind       | metric        | definition                                                           | best  |
//! |------------|---------------|----------------------------------------------------------------------|-------|
//! | `edges`    | `edge_f1`     | tolerant F1 of the sample's Canny edges vs the condition's edges     | 1     |
//! | `mask`     | `mask_iou`    | intersection over union of the sample's mask and the condition's     | 1     |
//! | `depth`    | `depth_rmse`  | RMSE of the sample's depth-like map vs the condition, `[0, 1]` units | 0     |
//! | `lowres`   | `lowres_psnr` | PSNR (peak 1) of the sample's low-resolution copy vs the condition   | 60 dB |
//! | `skeleton` | `skeleton_f1` | tolerant F1 of the sample's rendered skeleton vs the condition       | 1     |
//! | `trajectory` | `trajectory_error` | distance (px) between the centres of the sample's and the condition's heatmaps | 0 |
//!
//! - **Binary maps** (edges, mask, skeleton): condition pixels above [`BINARY_THRESHOLD`] are "on".
//! - **Tolerant F1** (`edge_f1`, `skeleton_f1`): a predicted pixel (from the sample) is a true positive when a
//!   reference pixel (from the condition) lies within Chebyshev distance [`F1_TOLERANCE`] (1 px), giving the
//!   precision; the recall is the same with the roles swapped; F1 = 2PR / (P + R). One pixel of slack because
//!   Canny and thinning place a boundary on either of the two pixels it falls between, so a perfectly obeyed
//!   condition can still be off by one. Both maps empty → 1 (nothing asked, nothing drawn); exactly one empty
//!   → 0. For skeletons the condition is [`Skeleton::render`](crate::data::conditions::Skeleton::render)'s map
//!   (1-px skeleton plus 3×3 dots on keypoints), compared with the same rendering of the sample: this is the
//!   "skeleton F1".
//! - **IoU** (`mask_iou`): |A ∩ B| / |A ∪ B|; both masks empty → 1.
//! - **RMSE** (`depth_rmse`): root mean squared difference over all pixels between
//!   [`depth_like`](crate::data::conditions::depth_like) of the sample and the condition. Lower is better.
//! - **PSNR** (`lowres_psnr`): 10·log10(1 / MSE) between
//!   [`low_resolution`](crate::data::conditions::low_resolution) of the sample (factor
//!   [`LOW_RES_FACTOR`](crate::data::conditions::LOW_RES_FACTOR)) and the condition, capped at
//!   [`PSNR_CAP_DB`] (60 dB) so that identical maps give a finite score.
//!
//! - **Trajectory error** (`trajectory_error`): the Euclidean distance in pixels between the
//!   [`brightness_centre`](crate::data::conditions::brightness_centre)s of the heatmap re-extracted from the sample
//!   and of the condition heatmap (the centre of a heatmap is its peak's position). Lower is better.
//!
//! Each metric is computed per image; [`FidelityScore::mean`] is the plain mean of the per-image scores (so for
//! PSNR it is the mean of per-image decibels, not the PSNR of the pooled MSE). A sample with several channels (a
//! Moving Fashion-MNIST clip: one per frame) is scored channel by channel against the condition's channels, and
//! its score is the mean over them (the per-frame metric averaged over frames); for `lowres` it is the PSNR of
//! the image's squared error averaged over all its channels. A colour sample `[N, 3, H, W]` of a single-channel
//! condition is scored by its luminance, the image its condition was extracted from; of a colour condition,
//! colour by colour for `lowres` (low-resolution copies keep their colour) and otherwise by the luminance of
//! both (a colour condition image given with the data).
use tch::{Device, Kind, Tensor};

use crate::data::conditions::{brightness_centre, ConditionKind, GrayImage};
use crate::{Error, Result};

/// Condition pixels strictly above this value are "on" in the binary maps (edges, mask, skeleton). The maps are
/// exactly 0/1 as extracted; 0.5 also keeps resized or interpolated maps meaningful.
pub const BINARY_THRESHOLD: f32 = 0.5;
/// Chebyshev distance (pixels) within which an edge or skeleton pixel counts as matched in the tolerant F1.
pub const F1_TOLERANCE: usize = 1;
/// Cap on the PSNR (dB): the score of identical maps and of any pair with MSE at most 1e-6 (which would score more).
pub const PSNR_CAP_DB: f64 = 60.0;
/// Slack allowed outside `[0, 1]` on condition values, for maps that went through half precision or resizing.
const CONDITION_SLACK: f32 = 1e-3;

/// Control-fidelity scores of a batch of samples for one condition kind.
#[derive(Debug, Clone, PartialEq)]
pub struct FidelityScore {
    /// Metric name, as returned by [`metric_name`].
    pub metric: &'static str,
    /// Mean of [`per_image`](Self::per_image).
    pub mean: f64,
    /// One score per sample, in batch order.
    pub per_image: Vec<f64>,
    /// Whether larger scores mean better fidelity (false only for `depth_rmse`).
    pub higher_is_better: bool,
}

/// The metric used for `kind`: `edge_f1`, `mask_iou`, `depth_rmse`, `lowres_psnr` or `skeleton_f1`.
pub fn metric_name(kind: ConditionKind) -> &'static str {
    match kind {
        ConditionKind::Edges => "edge_f1",
        ConditionKind::Mask => "mask_iou",
        ConditionKind::Depth => "depth_rmse",
        ConditionKind::LowRes => "lowres_psnr",
        ConditionKind::Skeleton => "skeleton_f1",
        ConditionKind::Trajectory => "trajectory_error",
        ConditionKind::Given => "none",
    }
}

/// Whether a larger score of `kind`'s metric is better (false for `depth_rmse` and `trajectory_error`).
pub fn higher_is_better(kind: ConditionKind) -> bool {
    !matches!(kind, ConditionKind::Depth | ConditionKind::Trajectory)
}

/// Scores `samples` (`[N, C, H, W]`, values in `[-1, 1]`, any device, floating point) against the `conditions`
/// they were generated from (`[N, C, H, W]` in `[0, 1]`, as
/// [`extract_batch`](crate::data::conditions::extract_batch)`(kind, ground_truth)` returns them). See the module
/// documentation for the metric of each kind.
///
/// Samples outside `[-1, 1]` are clamped (generated samples overshoot a little); non-finite samples, conditions
/// outside `[0, 1]`, an empty batch and mismatched shapes are [`Error::Config`].
pub fn fidelity(kind: ConditionKind, samples: &Tensor, conditions: &Tensor) -> Result<FidelityScore> {
    if kind == ConditionKind::Given {
        return Err(Error::Config(
            "conditions given with the data cannot be recomputed from a sample: there is no fidelity metric".into(),
        ));
    }
    // Conditions are extracted from the luminance of colour images, except `lowres`, which keeps each colour;
    // a colour condition image of another kind (given with the data) is compared by its luminance too.
    let lum = crate::data::conditions::luminance;
    let (samples, conditions) = match (samples.dim(), samples.size().get(1), conditions.size().get(1)) {
        (4, Some(3), Some(1)) => (lum(samples)?, conditions.shallow_clone()),
        (4, Some(3), Some(3)) if kind != ConditionKind::LowRes => (lum(samples)?, lum(conditions)?),
        (4, Some(1), Some(3)) if kind != ConditionKind::LowRes => (samples.shallow_clone(), lum(conditions)?),
        _ => (samples.shallow_clone(), conditions.shallow_clone()),
    };
    let conditions = &conditions;
    let (n, channels, h, w) = check_shapes(&samples, conditions)?;
    let s = to_cpu_vec(&samples, "samples")?;
    let c = to_cpu_vec(conditions, "conditions")?;
    if let Some(i) = s.iter().position(|v| !v.is_finite()) {
        return Err(Error::Config(format!(
            "fidelity: samples must be finite, but sample {} has value {} at pixel {}",
            i / (channels * h * w),
            s[i],
            i % (h * w)
        )));
    }
    if let Some(i) = c.iter().position(|v| !(-CONDITION_SLACK..=1.0 + CONDITION_SLACK).contains(v)) {
        return Err(Error::Config(format!(
            "fidelity: conditions must lie in [0, 1] (as extract_batch returns them), but condition {} has value {} \
             at pixel {}; pass the condition maps, not images in [-1, 1]",
            i / (channels * h * w),
            c[i],
            i % (h * w)
        )));
    }
    let per_channel: Vec<f64> = s
        .chunks_exact(h * w)
        .zip(c.chunks_exact(h * w))
        .map(|(sample, cond)| {
            let img = GrayImage {
                width: w,
                height: h,
                data: sample.iter().map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0)).collect(),
            };
            let extracted = kind.extract(&img).data;
            score(kind, w, h, &extracted, cond)
        })
        .collect();
    // Channels are the frames of a clip or the colours of a low-resolution colour image: an image scores the
    // mean of its channels' scores, or for `lowres` the PSNR of its mean squared error over all channels.
    let per_image: Vec<f64> = per_channel
        .chunks_exact(channels)
        .map(|c| match kind {
            ConditionKind::LowRes => psnr(c.iter().sum::<f64>() / channels as f64),
            _ => c.iter().sum::<f64>() / channels as f64,
        })
        .collect();
    let mean = per_image.iter().sum::<f64>() / n as f64;
    Ok(FidelityScore { metric: metric_name(kind), mean, per_image, higher_is_better: higher_is_better(kind) })
}

/// Checks that both tensors are floating-point `[N, C, H, W]` with the same, non-zero `N`, `C`, `H`, `W`.
fn check_shapes(samples: &Tensor, conditions: &Tensor) -> Result<(usize, usize, usize, usize)> {
    for (t, what) in [(samples, "samples"), (conditions, "conditions")] {
        let size = t.size();
        if size.len() != 4 {
            return Err(Error::Config(format!("fidelity: expected {what} of shape [N, C, H, W], got {size:?}")));
        }
        if !matches!(t.kind(), Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16) {
            return Err(Error::Config(format!("fidelity: expected floating-point {what}, got {:?}", t.kind())));
        }
    }
    let (ss, cs) = (samples.size(), conditions.size());
    if ss != cs {
        return Err(Error::Config(format!(
            "fidelity: conditions must have the samples' shape [N, C, H, W] = {ss:?}, got {cs:?}"
        )));
    }
    let (n, c, h, w) = (ss[0] as usize, ss[1] as usize, ss[2] as usize, ss[3] as usize);
    if n == 0 || c == 0 || h == 0 || w == 0 {
        return Err(Error::Config(format!("fidelity: need at least one non-empty image, got shape {ss:?}")));
    }
    Ok((n, c, h, w))
}

/// The tensor's values as one CPU `f32` vector, copied out once so that the per-image work is plain Rust.
fn to_cpu_vec(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    let flat = t.detach().f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_flatten(0, -1)?;
    Vec::<f32>::try_from(&flat).map_err(|e| Error::Config(format!("fidelity: cannot read {what}: {e}")))
}

/// One image's score for `kind`: `extracted` is the condition re-extracted from the sample, `cond` the reference.
fn score(kind: ConditionKind, w: usize, h: usize, extracted: &[f32], cond: &[f32]) -> f64 {
    let on = |m: &[f32]| -> Vec<bool> { m.iter().map(|&v| v > BINARY_THRESHOLD).collect() };
    match kind {
        ConditionKind::Edges | ConditionKind::Skeleton => tolerant_f1(w, h, &on(extracted), &on(cond), F1_TOLERANCE),
        ConditionKind::Mask => iou(&on(extracted), &on(cond)),
        ConditionKind::Depth => mse(extracted, cond).sqrt(),
        // The PSNR is taken of the whole image's mean squared error, once its channels are scored.
        ConditionKind::LowRes => mse(extracted, cond),
        ConditionKind::Trajectory => {
            let centre = |m: &[f32]| brightness_centre(&GrayImage { width: w, height: h, data: m.to_vec() });
            let ((ax, ay), (bx, by)) = (centre(extracted), centre(cond));
            (((ax - bx) as f64).powi(2) + ((ay - by) as f64).powi(2)).sqrt()
        }
        // Refused by `fidelity` before any image is scored.
        ConditionKind::Given => f64::NAN,
    }
}

/// F1 of `pred` against `reference` (binary `w × h` maps) where a pixel matches if the other map has a pixel
/// within Chebyshev distance `tol`. Both empty → 1, exactly one empty → 0.
fn tolerant_f1(w: usize, h: usize, pred: &[bool], reference: &[bool], tol: usize) -> f64 {
    let (np, nr) = (count(pred), count(reference));
    match (np, nr) {
        (0, 0) => return 1.0,
        (0, _) | (_, 0) => return 0.0,
        _ => {}
    }
    let near_ref = dilate(w, h, reference, tol);
    let near_pred = dilate(w, h, pred, tol);
    let tp_pred = pred.iter().zip(&near_ref).filter(|(&p, &r)| p && r).count();
    let tp_ref = reference.iter().zip(&near_pred).filter(|(&r, &p)| r && p).count();
    let precision = tp_pred as f64 / np as f64;
    let recall = tp_ref as f64 / nr as f64;
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

/// Intersection over union of two binary maps; both empty → 1.
fn iou(a: &[bool], b: &[bool]) -> f64 {
    let inter = a.iter().zip(b).filter(|(&x, &y)| x && y).count();
    let union = a.iter().zip(b).filter(|(&x, &y)| x || y).count();
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

fn count(m: &[bool]) -> usize {
    m.iter().filter(|&&v| v).count()
}

/// Binary dilation with a `(2r + 1)²` square (Chebyshev ball), done as a row pass then a column pass because the
/// square is separable.
fn dilate(w: usize, h: usize, m: &[bool], r: usize) -> Vec<bool> {
    let mut rows = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = (x.saturating_sub(r)..=(x + r).min(w - 1)).any(|xx| m[y * w + xx]);
        }
    }
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = (y.saturating_sub(r)..=(y + r).min(h - 1)).any(|yy| rows[yy * w + x]);
        }
    }
    out
}

/// Mean squared difference, accumulated in `f64`.
fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64
}

/// PSNR with peak 1, capped at [`PSNR_CAP_DB`].
fn psnr(mse: f64) -> f64 {
    if mse <= 10f64.powf(-PSNR_CAP_DB / 10.0) {
        PSNR_CAP_DB
    } else {
        -10.0 * mse.log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::conditions::extract_batch;

    const S: usize = 32;

    /// Six synthetic 32×32 ground-truth images in [-1, 1] (background -1): rectangles and ellipses of different
    /// sizes, positions and grey levels, one with shading inside (so that the low-res maps differ in more than the
    /// outline).
    fn ground_truth() -> Tensor {
        type Shape = Box<dyn Fn(f32, f32) -> Option<f32>>;
        let rect = |x0: f32, x1: f32, y0: f32, y1: f32, v: f32| -> Shape {
            Box::new(move |x, y| (x >= x0 && x < x1 && y >= y0 && y < y1).then_some(v))
        };
        let ellipse = |cx: f32, cy: f32, rx: f32, ry: f32, v: f32| -> Shape {
            Box::new(move |x, y| {
                let (dx, dy) = ((x - cx) / rx, (y - cy) / ry);
                (dx * dx + dy * dy <= 1.0).then_some(v)
            })
        };
        let shapes: Vec<Shape> = vec![
            rect(4.0, 14.0, 5.0, 21.0, 1.0),
            ellipse(20.0, 18.0, 9.0, 6.0, 0.6),
            rect(18.0, 29.0, 3.0, 10.0, 0.8),
            Box::new(|x, y| {
                let (dx, dy) = ((x - 15.0) / 12.0, (y - 16.0) / 10.0);
                (dx * dx + dy * dy <= 1.0).then_some(1.0 - 1.2 * (dx * dx + dy * dy))
            }),
            rect(8.0, 27.0, 22.0, 29.0, 0.9),
            ellipse(9.0, 24.0, 5.0, 5.0, 1.0),
        ];
        let mut data = Vec::new();
        for shape in &shapes {
            for y in 0..S {
                for x in 0..S {
                    data.push(shape(x as f32, y as f32).unwrap_or(-1.0));
                }
            }
        }
        Tensor::from_slice(&data).view([shapes.len() as i64, 1, S as i64, S as i64])
    }

    /// The batch with image `i` replaced by image `i + 1 (mod N)`: a derangement, so no image keeps its pair.
    fn rolled(t: &Tensor) -> Tensor {
        t.roll([-1], [0])
    }

    fn grid(w: usize, h: usize, on: &[(usize, usize)]) -> Vec<bool> {
        let mut m = vec![false; w * h];
        for &(x, y) in on {
            m[y * w + x] = true;
        }
        m
    }

    #[test]
    fn names_and_directions() {
        let names: Vec<_> = ConditionKind::ALL.iter().map(|&k| metric_name(k)).collect();
        assert_eq!(names, ["edge_f1", "mask_iou", "depth_rmse", "lowres_psnr", "skeleton_f1"]);
        let better: Vec<_> = ConditionKind::ALL.iter().map(|&k| higher_is_better(k)).collect();
        assert_eq!(better, [true, true, false, true, true]);
    }

    #[test]
    fn ground_truth_scores_perfectly_and_shuffled_pairs_do_not() {
        let gt = ground_truth();
        let n = gt.size()[0] as usize;
        for kind in ConditionKind::ALL {
            let cond = extract_batch(kind, &gt).unwrap();
            let own = fidelity(kind, &gt, &cond).unwrap();
            let shuffled = fidelity(kind, &gt, &rolled(&cond)).unwrap();
            assert_eq!(own.metric, metric_name(kind));
            assert_eq!(own.higher_is_better, higher_is_better(kind));
            assert_eq!(own.per_image.len(), n);
            assert_eq!(shuffled.per_image.len(), n);
            let perfect = match kind {
                ConditionKind::Depth => 0.0,
                ConditionKind::LowRes => PSNR_CAP_DB,
                _ => 1.0,
            };
            assert!(own.per_image.iter().all(|&v| v == perfect), "{kind}: {:?}", own.per_image);
            assert_eq!(own.mean, perfect);
            let mean = shuffled.per_image.iter().sum::<f64>() / n as f64;
            assert!((shuffled.mean - mean).abs() < 1e-12);
            // Every mismatched pair is clearly worse, and so is the mean.
            let (worst_ok, mean_ok) = match kind {
                ConditionKind::Edges | ConditionKind::Skeleton => (0.4, 0.3),
                ConditionKind::Mask => (0.4, 0.2),
                ConditionKind::Depth => (0.15, 0.2),
                ConditionKind::LowRes => (15.0, 12.0),
                ConditionKind::Given | ConditionKind::Trajectory => unreachable!("not in ConditionKind::ALL"),
            };
            if own.higher_is_better {
                assert!(shuffled.per_image.iter().all(|&v| v < worst_ok), "{kind}: {:?}", shuffled.per_image);
                assert!(shuffled.mean < mean_ok, "{kind}: {}", shuffled.mean);
            } else {
                assert!(shuffled.per_image.iter().all(|&v| v > worst_ok), "{kind}: {:?}", shuffled.per_image);
                assert!(shuffled.mean > mean_ok, "{kind}: {}", shuffled.mean);
            }
        }
    }

    #[test]
    fn edge_f1_tolerates_a_one_pixel_shift() {
        // The whole scene moved diagonally by one pixel: every edge moves by Chebyshev distance 1, inside the
        // tolerance (the shapes keep clear of the border, so nothing wraps round and Canny commutes with the shift).
        let gt = ground_truth();
        let cond = extract_batch(ConditionKind::Edges, &gt).unwrap();
        let score = fidelity(ConditionKind::Edges, &gt.roll([1, 1], [2, 3]), &cond).unwrap();
        assert!(score.per_image.iter().all(|&v| v == 1.0), "{:?}", score.per_image);
        // Three pixels is beyond it (only edge stretches parallel to the shift still line up).
        let score = fidelity(ConditionKind::Edges, &gt.roll([3, 3], [2, 3]), &cond).unwrap();
        assert!(score.mean < 0.35, "{:?}", score.per_image);
    }

    #[test]
    fn tolerant_f1_by_hand() {
        let (w, h) = (8, 8);
        let seg = |y: usize, xs: std::ops::Range<usize>| grid(w, h, &xs.map(|x| (x, y)).collect::<Vec<_>>());
        // Offset by one row: every pixel is matched both ways.
        assert_eq!(tolerant_f1(w, h, &seg(2, 1..5), &seg(3, 1..5), 1), 1.0);
        // Offset by three rows: nothing is.
        assert_eq!(tolerant_f1(w, h, &seg(2, 1..5), &seg(5, 1..5), 1), 0.0);
        // Side by side on one row: only the two facing ends match → P = R = 1/4 → F1 = 1/4.
        assert_eq!(tolerant_f1(w, h, &seg(2, 0..4), &seg(2, 4..8), 1), 0.25);
        // Without tolerance the one-row offset is a complete miss.
        assert_eq!(tolerant_f1(w, h, &seg(2, 1..5), &seg(3, 1..5), 0), 0.0);
        // Unequal sizes: predicted columns 2, 3 both lie on the reference (columns 1..=6) → P = 1; reference columns
        // 1..=4 lie within 1 of a predicted pixel, 5 and 6 do not → R = 4/6; F1 = 2·(2/3) / (5/3) = 4/5.
        assert!((tolerant_f1(w, h, &seg(4, 2..4), &seg(4, 1..7), 1) - 0.8).abs() < 1e-12);
        let empty = vec![false; w * h];
        assert_eq!(tolerant_f1(w, h, &empty, &empty, 1), 1.0);
        assert_eq!(tolerant_f1(w, h, &seg(2, 1..5), &empty, 1), 0.0);
        assert_eq!(tolerant_f1(w, h, &empty, &seg(2, 1..5), 1), 0.0);
    }

    /// A `[1, 1, 16, 16]` tensor with value `inside` over columns `x0..x1`, rows `y0..y1` and `outside` elsewhere.
    fn block(x0: usize, x1: usize, y0: usize, y1: usize, inside: f32, outside: f32) -> Tensor {
        let data: Vec<f32> = (0..256)
            .map(|i| if (x0..x1).contains(&(i % 16)) && (y0..y1).contains(&(i / 16)) { inside } else { outside })
            .collect();
        Tensor::from_slice(&data).view([1, 1, 16, 16])
    }

    #[test]
    fn mask_iou_depth_rmse_and_psnr_by_hand() {
        // Sample mask: columns 0..8 of rows 0..4 (32 px); condition: columns 4..12 (32 px); overlap 16 → 16 / 48.
        let sample = block(0, 8, 0, 4, 1.0, -1.0);
        let iou = fidelity(ConditionKind::Mask, &sample, &block(4, 12, 0, 4, 1.0, 0.0)).unwrap();
        assert!((iou.mean - 1.0 / 3.0).abs() < 1e-12, "{iou:?}");
        let black = block(0, 0, 0, 0, 0.0, -1.0);
        let nothing = block(0, 0, 0, 0, 0.0, 0.0);
        assert_eq!(fidelity(ConditionKind::Mask, &black, &nothing).unwrap().mean, 1.0);
        assert_eq!(fidelity(ConditionKind::Mask, &sample, &nothing).unwrap().mean, 0.0);
        // A black sample has depth 0 everywhere: RMSE against a constant 0.5 map is 0.5.
        let half = block(0, 0, 0, 0, 0.0, 0.5);
        let rmse = fidelity(ConditionKind::Depth, &black, &half).unwrap();
        assert!((rmse.mean - 0.5).abs() < 1e-7, "{rmse:?}");
        assert!(!rmse.higher_is_better);
        // Black vs a constant 0.1: MSE 0.01 → 20 dB.
        let psnr = fidelity(ConditionKind::LowRes, &black, &block(0, 0, 0, 0, 0.0, 0.1)).unwrap();
        assert!((psnr.mean - 20.0).abs() < 1e-4, "{psnr:?}");
    }

    #[test]
    fn samples_are_clamped_like_extract_batch() {
        // Generated samples overshoot [-1, 1]; clamping maps a ±1.5 image onto the ±1 image it overshoots.
        let binary = ground_truth().sign();
        for kind in ConditionKind::ALL {
            let cond = extract_batch(kind, &binary).unwrap();
            let score = fidelity(kind, &(&binary * 1.5), &cond).unwrap();
            let own = fidelity(kind, &binary, &cond).unwrap();
            assert_eq!(score, own, "{kind}");
        }
    }

    #[test]
    fn bad_inputs_are_config_errors() {
        let gt = ground_truth();
        let cond = extract_batch(ConditionKind::Mask, &gt).unwrap();
        let is_config = |r: Result<FidelityScore>| match r {
            Err(Error::Config(msg)) => msg,
            other => panic!("expected a configuration error, got {other:?}"),
        };
        // Different N, H, W.
        let msg = is_config(fidelity(ConditionKind::Mask, &gt, &cond.narrow(0, 0, 3)));
        assert!(msg.contains("[N, C, H, W]"), "{msg}");
        is_config(fidelity(ConditionKind::Mask, &gt, &cond.narrow(2, 0, 16)));
        is_config(fidelity(ConditionKind::Mask, &gt, &cond.narrow(3, 0, 16)));
        // Channel counts that differ (other than colour samples of a grey condition), or no channel axis.
        is_config(fidelity(ConditionKind::Mask, &gt.repeat([1, 2, 1, 1]), &cond));
        is_config(fidelity(ConditionKind::Mask, &gt, &cond.repeat([1, 2, 1, 1])));
        is_config(fidelity(ConditionKind::Mask, &gt.squeeze_dim(1), &cond.squeeze_dim(1)));
        // Empty batch, non-finite samples, conditions given in [-1, 1], integer tensors.
        is_config(fidelity(ConditionKind::Mask, &gt.narrow(0, 0, 0), &cond.narrow(0, 0, 0)));
        is_config(fidelity(ConditionKind::Mask, &(&gt * f64::NAN), &cond));
        let msg = is_config(fidelity(ConditionKind::Mask, &gt, &(&cond * 2.0 - 1.0)));
        assert!(msg.contains("[0, 1]"), "{msg}");
        is_config(fidelity(ConditionKind::Mask, &gt, &cond.to_kind(Kind::Int64)));
    }

    #[test]
    fn colour_samples_are_scored_by_their_luminance() {
        let gt = ground_truth();
        let cond = extract_batch(ConditionKind::Edges, &gt).unwrap();
        let grey = fidelity(ConditionKind::Edges, &gt, &cond).unwrap();
        // A grey image written in colour (R = G = B) scores as the grey image.
        let colour = fidelity(ConditionKind::Edges, &gt.repeat([1, 3, 1, 1]), &cond).unwrap();
        for (a, b) in grey.per_image.iter().zip(&colour.per_image) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        // The luminance of R = G = B is the grey image itself (the weights sum to 1).
        let lum = crate::data::conditions::luminance(&gt.repeat([1, 3, 1, 1])).unwrap();
        assert!(lum.allclose(&gt, 1e-6, 1e-6, false));
    }

    #[test]
    fn colour_lowres_is_scored_colour_by_colour_and_colour_conditions_of_other_kinds_by_luminance() {
        // Colour images: the ground truth in three different brightnesses per colour.
        let gt = ground_truth();
        let colour = Tensor::cat(&[&gt, &(&gt * 0.5), &(&gt * 0.25 - 0.5)], 1);
        let lowres = extract_batch(ConditionKind::LowRes, &colour).unwrap();
        assert_eq!(lowres.size()[1], 3);
        let own = fidelity(ConditionKind::LowRes, &colour, &lowres).unwrap();
        assert!(own.per_image.iter().all(|&p| p == PSNR_CAP_DB), "{:?}", own.per_image);
        // One colour of three shifted by δ (clamped to [0, 1]): the score is the PSNR of the squared error
        // averaged over the whole image, all three colours (at most δ²/3), not the mean of per-colour PSNRs.
        let delta = 0.1f64;
        let off = Tensor::cat(&[&(lowres.narrow(1, 0, 1) + delta), &lowres.narrow(1, 1, 2)], 1).clamp(0.0, 1.0);
        let off_score = fidelity(ConditionKind::LowRes, &colour, &off).unwrap();
        for (i, p) in off_score.per_image.iter().enumerate() {
            let err = (off.get(i as i64) - lowres.get(i as i64)).square().mean(Kind::Double).double_value(&[]);
            let want = -10.0 * err.log10();
            assert!((p - want).abs() < 1e-4, "image {i}: {p} vs {want}");
            assert!(err <= delta * delta / 3.0 + 1e-9, "image {i}: {err}");
        }
        // Colour edges given with the data (R = G = B) score as the grey condition against the luminance.
        let edges = extract_batch(ConditionKind::Edges, &crate::data::conditions::luminance(&colour).unwrap()).unwrap();
        let grey = fidelity(ConditionKind::Edges, &colour, &edges).unwrap();
        let given = fidelity(ConditionKind::Edges, &colour, &edges.repeat([1, 3, 1, 1])).unwrap();
        assert_eq!(grey.per_image, given.per_image);
        assert!(grey.per_image.iter().all(|&f| f == 1.0), "{:?}", grey.per_image);
    }

    #[test]
    fn several_channels_score_channel_by_channel_and_average() {
        // Two "frames": the ground truth, then the ground truth rolled by one image (every pair mismatched).
        let gt = ground_truth();
        let cond = extract_batch(ConditionKind::Edges, &gt).unwrap();
        let frames = Tensor::cat(&[&gt, &gt], 1);
        let conds = Tensor::cat(&[&cond, &rolled(&cond)], 1);
        let both = fidelity(ConditionKind::Edges, &frames, &conds).unwrap();
        let first = fidelity(ConditionKind::Edges, &gt, &cond).unwrap();
        let second = fidelity(ConditionKind::Edges, &gt, &rolled(&cond)).unwrap();
        for i in 0..both.per_image.len() {
            let want = (first.per_image[i] + second.per_image[i]) / 2.0;
            assert!((both.per_image[i] - want).abs() < 1e-12, "clip {i}: {} vs {want}", both.per_image[i]);
        }
        // And extract_batch extracts each channel on its own.
        let per_frame = extract_batch(ConditionKind::Edges, &frames).unwrap();
        assert!(per_frame.equal(&Tensor::cat(&[&cond, &cond], 1)));
    }

    #[test]
    fn trajectory_error_is_the_distance_between_heatmap_centres() {
        // A bright 4×4 square at x 4..8, y 10..14 (centre (6, 12)); the sample's square is 3 px right, 4 px down.
        let square = |x0: i64, y0: i64| {
            let t = Tensor::full([1, 1, 32, 32], -1.0, (Kind::Float, Device::Cpu));
            let _ = t.narrow(2, y0, 4).narrow(3, x0, 4).fill_(1.0);
            t
        };
        let cond = extract_batch(ConditionKind::Trajectory, &square(4, 10)).unwrap();
        assert!((cond.double_value(&[0, 0, 11, 5]) - (-0.5f64 / 4.5).exp()).abs() < 1e-5, "beside the peak at (6, 12)");
        let own = fidelity(ConditionKind::Trajectory, &square(4, 10), &cond).unwrap();
        assert!(own.mean < 1e-4, "{own:?}");
        assert!(!own.higher_is_better && own.metric == "trajectory_error");
        let moved = fidelity(ConditionKind::Trajectory, &square(7, 14), &cond).unwrap();
        assert!((moved.mean - 5.0).abs() < 1e-3, "a 3-4-5 displacement: {moved:?}");
        assert_eq!("trajectory".parse::<ConditionKind>().unwrap(), ConditionKind::Trajectory);
    }

    #[test]
    fn given_conditions_have_no_metric() {
        let x = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        let err = fidelity(ConditionKind::Given, &x, &x).unwrap_err().to_string();
        assert!(err.contains("no fidelity metric"), "{err}");
    }
}
