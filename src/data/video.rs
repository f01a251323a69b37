//! Moving Fashion-MNIST: short clips of Fashion-MNIST items moving on a black canvas, generated
//! here (no registry ships video). Each item is shrunk to `item_size`, given a random start and a
//! random direction and speed, moves in straight lines and reflects at the walls; several items are
//! combined with a pixel-wise max. Positions are rendered on the integer grid, so every item's centre
//! in every frame is known exactly (tests check that the trajectory condition, a heatmap at each
//! frame's centre of brightness, finds them).
//!
//! A clip is stored with its frames as channels, `[F, S, S]`: to the diffusion objectives, samplers
//! and the trainer a clip is an image with `F` channels; the video networks split the frames again.
//! Training clips take their items from the training split, held-out clips from the test split, so
//! the two never share an item.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::Dataset;
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// How clips are generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MovingConfig {
    /// Frames per clip. Default 8.
    pub frames: i64,
    /// Side of the square canvas, in pixels. Default 32.
    pub canvas: i64,
    /// Side of an item on the canvas (the 32×32 Fashion-MNIST image, area-averaged down). Default 16.
    pub item_size: i64,
    /// Items per clip; the clip's label is the first item's class. Default 1.
    pub items: i64,
    /// Slowest speed, pixels per frame. Default 1.
    pub min_speed: f64,
    /// Fastest speed, pixels per frame. Default 3.
    pub max_speed: f64,
    /// Clips per split (0 = one per item of the split). Default 10000.
    pub clips: i64,
    /// Seed of the clips (the test split's clips use a seed derived from it). Default 0.
    pub seed: u64,
}

impl Default for MovingConfig {
    fn default() -> Self {
        Self { frames: 8, canvas: 32, item_size: 16, items: 1, min_speed: 1.0, max_speed: 3.0, clips: 10000, seed: 0 }
    }
}

impl MovingConfig {
    /// Rejects settings that cannot produce clips.
    pub fn validate(&self) -> Result<()> {
        if self.frames < 1 || self.items < 1 || self.item_size < 1 || self.clips < 0 {
            return Err(Error::Config("video: frames, items and item_size must be ≥ 1 and clips ≥ 0".into()));
        }
        if self.frames == 3 {
            // Three-channel samples are RGB images to the image writers.
            return Err(Error::Config("video: use 2 or ≥ 4 frames (three-channel samples are RGB images)".into()));
        }
        if self.item_size > self.canvas {
            return Err(Error::Config(format!(
                "video: item_size {} does not fit on a {} canvas",
                self.item_size, self.canvas
            )));
        }
        if !(0.0 <= self.min_speed && self.min_speed <= self.max_speed && self.max_speed.is_finite()) {
            return Err(Error::Config("video: need 0 ≤ min_speed ≤ max_speed".into()));
        }
        Ok(())
    }
}

/// Generated clips with their ground truth.
#[derive(Debug)]
pub struct Clips {
    /// Frames as channels, `f32 [N, F, S, S]` in `[-1, 1]` (black canvas = −1).
    pub frames: Tensor,
    /// The first item's class, `i64 [N]`.
    pub labels: Tensor,
    /// Item centres `(x, y)` in pixels, `f32 [N, F, items, 2]` (pixel `i` spans `[i, i+1)`).
    pub centres: Tensor,
}

/// One item's path: integer top-left corners, one per frame, reflecting at the walls.
fn path(rng: &mut SplitMix64, cfg: &MovingConfig) -> Vec<(i64, i64)> {
    let span = (cfg.canvas - cfg.item_size) as f64;
    let unit = |rng: &mut SplitMix64| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let (mut x, mut y) = (unit(rng) * span, unit(rng) * span);
    let angle = unit(rng) * std::f64::consts::TAU;
    let speed = cfg.min_speed + unit(rng) * (cfg.max_speed - cfg.min_speed);
    let (mut vx, mut vy) = (speed * angle.cos(), speed * angle.sin());
    let reflect = |p: &mut f64, v: &mut f64| {
        if span == 0.0 {
            *p = 0.0;
            return;
        }
        // Fold the position back into [0, span] (several bounces if the speed exceeds the span).
        loop {
            if *p < 0.0 {
                *p = -*p;
                *v = -*v;
            } else if *p > span {
                *p = 2.0 * span - *p;
                *v = -*v;
            } else {
                break;
            }
        }
    };
    let mut out = Vec::with_capacity(cfg.frames as usize);
    for f in 0..cfg.frames {
        if f > 0 {
            x += vx;
            y += vy;
            reflect(&mut x, &mut vx);
            reflect(&mut y, &mut vy);
        }
        out.push((x.round() as i64, y.round() as i64));
    }
    out
}

/// Generates `n` clips from `items` (a dataset of single-channel images in `[-1, 1]`), reproducibly
/// from `seed`: clip `i` draws its items and motion from `derive_seed(seed, i)`.
pub fn generate(items: &Dataset, n: i64, cfg: &MovingConfig, seed: u64) -> Result<Clips> {
    cfg.validate()?;
    if items.is_empty() || items.channels() != 1 {
        return Err(Error::Config("video: the item dataset must hold single-channel images".into()));
    }
    let (m, k) = (items.len() as u64, cfg.item_size);
    // Items in [0, 1] (black = 0), area-averaged to item_size (bilinear when enlarging).
    let small = tch::no_grad(|| -> Result<Tensor> {
        let unit = items.images.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?.f_mul_scalar(0.5)?;
        let s = unit.size()[2];
        Ok(if k <= s {
            unit.f_adaptive_avg_pool2d([k, k])?
        } else {
            unit.f_upsample_bilinear2d([k, k], false, None, None)?
        })
    })?;
    let small: Vec<f32> = Vec::try_from(small.f_clamp(0.0, 1.0)?.f_flatten(0, -1)?.f_to_device(tch::Device::Cpu)?)?;
    let labels_all: Vec<i64> = Vec::try_from(items.labels.f_to_device(tch::Device::Cpu)?)?;
    let (f, s, j) = (cfg.frames as usize, cfg.canvas as usize, cfg.items as usize);
    let (ku, area) = (k as usize, (k * k) as usize);
    let mut frames = vec![0f32; n as usize * f * s * s];
    let mut centres = Vec::with_capacity(n as usize * f * j * 2);
    let mut labels = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        let mut rng = SplitMix64::new(crate::rng::derive_seed(seed, i as u64));
        let picks: Vec<usize> = (0..j).map(|_| rng.below(m) as usize).collect();
        labels.push(labels_all[picks[0]]);
        let paths: Vec<Vec<(i64, i64)>> = (0..j).map(|_| path(&mut rng, cfg)).collect();
        for fr in 0..f {
            let canvas = &mut frames[(i * f + fr) * s * s..(i * f + fr + 1) * s * s];
            for (pick, p) in picks.iter().zip(&paths) {
                let (x0, y0) = (p[fr].0 as usize, p[fr].1 as usize);
                let item = &small[pick * area..(pick + 1) * area];
                for yy in 0..ku {
                    for xx in 0..ku {
                        let c = &mut canvas[(y0 + yy) * s + x0 + xx];
                        *c = c.max(item[yy * ku + xx]);
                    }
                }
            }
            for p in &paths {
                centres.push(p[fr].0 as f32 + k as f32 / 2.0);
                centres.push(p[fr].1 as f32 + k as f32 / 2.0);
            }
        }
    }
    let sz = cfg.canvas;
    Ok(Clips {
        frames: Tensor::from_slice(&frames).f_view([n, cfg.frames, sz, sz])?.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?,
        labels: Tensor::from_slice(&labels),
        centres: Tensor::from_slice(&centres).f_view([n, cfg.frames, cfg.items, 2])?,
    })
}

/// The clips of one split as a [`Dataset`] (frames as channels, labels = the first item's class), made
/// from `items`, that split's images: `cfg.clips` of them (0 = one per item), seeded by `cfg.seed`
/// (training split) or a seed derived from it (test split).
pub fn clips_dataset(items: &Dataset, cfg: &MovingConfig, test: bool) -> Result<Dataset> {
    let n = if cfg.clips > 0 { cfg.clips } else { items.len() as i64 };
    let seed = if test { crate::rng::derive_seed(cfg.seed, 1) } else { cfg.seed };
    let clips = generate(items, n, cfg, seed)?;
    Ok(Dataset {
        images: clips.frames,
        labels: clips.labels,
        num_classes: items.num_classes,
        class_names: items.class_names.clone(),
        conditioning: None,
    })
}

/// The centre of brightness of each frame of `frames` `[N, F, S, S]` in `[-1, 1]` (black = −1):
/// `(x, y)` in pixels, `[N, F, 2]`. A black frame gives the canvas centre.
pub fn brightness_centres(frames: &Tensor) -> Result<Tensor> {
    let s = frames.size()[3];
    let w = frames.f_add_scalar(1.0)?.f_mul_scalar(0.5)?.f_clamp(0.0, 1.0)?;
    let grid = Tensor::f_arange(s, (Kind::Float, frames.device()))?.f_add_scalar(0.5)?;
    let total = w.f_sum_dim_intlist([2, 3].as_slice(), false, Kind::Float)?;
    let mx = w.f_mul(&grid.f_view([1, 1, 1, s])?)?.f_sum_dim_intlist([2, 3].as_slice(), false, Kind::Float)?;
    let my = w.f_mul(&grid.f_view([1, 1, s, 1])?)?.f_sum_dim_intlist([2, 3].as_slice(), false, Kind::Float)?;
    let safe = total.f_clamp_min(1e-6)?;
    let centre = s as f64 / 2.0;
    let empty = total.f_le(1e-6)?;
    let x = mx.f_div(&safe)?.f_masked_fill(&empty, centre)?;
    let y = my.f_div(&safe)?.f_masked_fill(&empty, centre)?;
    Ok(Tensor::f_stack(&[x, y], 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn items() -> Dataset {
        // Four 32×32 "items": a bright square of side 16 in the middle, whose shrunk version is known.
        let img = Tensor::full([4, 1, 32, 32], -1.0, (Kind::Float, Device::Cpu));
        let _ = img.narrow(2, 8, 16).narrow(3, 8, 16).fill_(1.0);
        Dataset {
            images: img,
            labels: Tensor::from_slice(&[0i64, 1, 2, 3]),
            num_classes: 4,
            class_names: (0..4).map(|i| i.to_string()).collect(),
            conditioning: None,
        }
    }

    #[test]
    fn items_move_in_straight_lines_reflect_at_the_walls_and_sit_where_their_centres_say() {
        let cfg = MovingConfig { frames: 12, item_size: 8, min_speed: 2.0, max_speed: 3.0, ..MovingConfig::default() };
        let clips = generate(&items(), 20, &cfg, 7).unwrap();
        assert_eq!(clips.frames.size(), [20, 12, 32, 32]);
        assert_eq!(clips.centres.size(), [20, 12, 1, 2]);
        let c: Vec<f32> = Vec::try_from(clips.centres.flatten(0, -1)).unwrap();
        let mut bounced = 0;
        for i in 0..20 {
            let at = |f: usize, d: usize| c[(i * 12 + f) * 2 + d] as f64;
            for f in 0..12 {
                // Inside the canvas.
                for d in 0..2 {
                    assert!((4.0..=28.0).contains(&at(f, d)), "clip {i} frame {f}: {}", at(f, d));
                }
                // The shrunk item is a centred 4×4 bright square: its centre of brightness is the centre.
            }
            for f in 1..12 {
                let step = ((at(f, 0) - at(f - 1, 0)).powi(2) + (at(f, 1) - at(f - 1, 1)).powi(2)).sqrt();
                // Rounding moves each coordinate by at most 1 pixel; a bounce only shortens the step.
                assert!(step <= 3.0 + 2f64.sqrt() + 1e-9, "clip {i}: step {step}");
            }
            // Straight lines: away from the walls the step vector stays constant up to rounding.
            let (d0x, d1x) = (at(1, 0) - at(0, 0), at(2, 0) - at(1, 0));
            if (d0x - d1x).abs() > 1.0 + 1e-9 {
                bounced += 1;
            }
        }
        assert!(bounced < 20, "every clip bounced in its first three frames");
        let found = brightness_centres(&clips.frames).unwrap();
        let truth = clips.centres.select(2, 0);
        let err = (&found - &truth).abs().max().double_value(&[]);
        assert!(err < 1e-3, "the centre of brightness of a symmetric item is its centre: {err}");
        // Reproducible, and the label is the item's class.
        let again = generate(&items(), 20, &cfg, 7).unwrap();
        assert!(again.frames.equal(&clips.frames) && again.labels.equal(&clips.labels));
        assert!(!generate(&items(), 20, &cfg, 8).unwrap().frames.equal(&clips.frames));
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            MovingConfig { item_size: 40, ..MovingConfig::default() },
            MovingConfig { min_speed: 3.0, max_speed: 1.0, ..MovingConfig::default() },
            MovingConfig { frames: 0, ..MovingConfig::default() },
        ] {
            assert!(generate(&items(), 2, &bad, 0).is_err());
        }
    }
}
