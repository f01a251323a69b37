//! Video metrics for Moving Fashion-MNIST clips (frames as channels, values in `[-1, 1]`).
//!
//! **Temporal flicker**: for each frame, a `crop`×`crop` window centred on its
//! [`brightness_centre`] (clamped inside the canvas); the flicker of a clip is the mean absolute
//! difference (intensity in `[0, 1]`) between the windows of consecutive frames, averaged over the
//! pairs. An item that moves rigidly keeps its centre of brightness at the same place on itself, so
//! ground-truth clips score 0 (up to items touching each other); a generator whose object changes
//! shape, shade or identity from frame to frame scores higher. Lower is better.
use tch::{Device, Kind, Tensor};

use crate::data::conditions::{brightness_centre, GrayImage};
use crate::{Error, Result};

/// The temporal flicker of each clip of `clips` `[N, F, S, S]` (see the module documentation); needs F ≥ 2.
pub fn temporal_flicker(clips: &Tensor, crop: i64) -> Result<Vec<f64>> {
    let size = clips.size();
    let [n, f, h, w] = size.as_slice() else {
        return Err(Error::Config(format!("temporal flicker: expected clips [N, F, H, W], got {size:?}")));
    };
    let (n, f, h, w) = (*n as usize, *f as usize, *h as usize, *w as usize);
    if f < 2 || crop < 1 || crop as usize > h.min(w) {
        return Err(Error::Config(format!(
            "temporal flicker: needs at least 2 frames and a crop of 1 ..= {} pixels (got {f} frames, crop {crop})",
            h.min(w)
        )));
    }
    let flat: Vec<f32> =
        Vec::try_from(clips.detach().f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?;
    let k = crop as usize;
    let window = |frame: &[f32]| -> Vec<f32> {
        let img =
            GrayImage { width: w, height: h, data: frame.iter().map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0)).collect() };
        let (cx, cy) = brightness_centre(&img);
        let x0 = ((cx - k as f32 / 2.0).round().max(0.0) as usize).min(w - k);
        let y0 = ((cy - k as f32 / 2.0).round().max(0.0) as usize).min(h - k);
        (0..k * k).map(|i| img.get(x0 + i % k, y0 + i / k)).collect()
    };
    Ok((0..n)
        .map(|i| {
            let windows: Vec<Vec<f32>> =
                (0..f).map(|j| window(&flat[(i * f + j) * h * w..(i * f + j + 1) * h * w])).collect();
            windows
                .windows(2)
                .map(|p| p[0].iter().zip(&p[1]).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / (k * k) as f64)
                .sum::<f64>()
                / (f - 1) as f64
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::video::{generate, MovingConfig};
    use crate::data::Dataset;

    #[test]
    fn rigidly_moving_items_do_not_flicker_and_changing_ones_do() {
        // Items with texture (asymmetric), so the window must follow the item exactly.
        tch::manual_seed(0);
        let items = Dataset {
            images: Tensor::rand([6, 1, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0,
            labels: Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5]),
            num_classes: 6,
            class_names: (0..6).map(|i| i.to_string()).collect(),
            conditioning: None,
        };
        let cfg = MovingConfig { frames: 5, clips: 6, ..MovingConfig::default() };
        let clips = generate(&items, 6, &cfg, 3).unwrap().frames;
        let still = temporal_flicker(&clips, 16).unwrap();
        assert!(still.iter().all(|&v| v < 1e-6), "{still:?}");
        // Swap frame 2 of every clip with frame 2 of the next clip: a different item appears.
        let swapped =
            Tensor::cat(&[clips.narrow(1, 0, 2), clips.narrow(1, 2, 1).roll([1], [0]), clips.narrow(1, 3, 2)], 1);
        let jumpy = temporal_flicker(&swapped, 16).unwrap();
        assert!(jumpy.iter().all(|&v| v > 0.05), "{jumpy:?}");
        assert!(temporal_flicker(&clips.narrow(1, 0, 1), 16).is_err());
    }
}
