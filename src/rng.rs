//! A tiny deterministic RNG for host-side choices (data order, splits) whose whole state is one
//! `u64`, so checkpoints can save and restore it exactly. Tensor noise uses libtorch's generator,
//! reseeded per step from `(seed, step)` (see `train`), so it needs no saved state either.

/// SplitMix64: fast, statistically sound for shuffling, state is a single `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitMix64 {
    /// The full generator state.
    pub state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift; the bias is < n / 2^64, negligible for our sizes.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// Fisher–Yates shuffle of `items`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Standard normal noise of `shape` and `kind`, drawn on the CPU from libtorch's global generator
/// and moved to `device`: the same numbers on every device (CUDA's generator draws others), so a
/// run's noise, and with it its result up to rounding, does not depend on where it runs.
pub fn randn_on_host(shape: &[i64], kind: tch::Kind, device: tch::Device) -> crate::Result<tch::Tensor> {
    Ok(tch::Tensor::f_randn(shape, (kind, tch::Device::Cpu))?.f_to_device(device)?)
}

/// [`randn_on_host`] shaped, typed and placed like `like`.
pub fn randn_like_on_host(like: &tch::Tensor) -> crate::Result<tch::Tensor> {
    randn_on_host(&like.size(), like.kind(), like.device())
}

/// Which rows of a global batch this process's micro-batch holds, in data-parallel training: rows
/// `start..start + B` of `total`. Per-example draws ([`per_example`]) are made for the whole global batch
/// and sliced, so each process draws what a single process training the whole batch would for its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    /// The first row of this process's shard.
    pub start: i64,
    /// The rows of the global batch.
    pub total: i64,
}

/// A per-example random tensor of `shape` (examples along dimension 0) from `draw`: for a micro-batch that
/// holds `rows` of a larger global batch (a data-parallel shard, [`crate::train::step::Batch::rows`]), `draw`
/// makes the draw of the whole global batch and the shard keeps its rows; otherwise `draw(shape)`. Tasks draw
/// their per-example randomness (dropout masks, random targets) through it with their batch's rows, so that
/// training on several processes draws what one process would.
pub fn per_example(
    rows: Option<Rows>,
    shape: &[i64],
    draw: impl FnOnce(&[i64]) -> crate::Result<tch::Tensor>,
) -> crate::Result<tch::Tensor> {
    match rows {
        Some(r) if !shape.is_empty() && r.start + shape[0] <= r.total && shape[0] < r.total => {
            let mut full = shape.to_vec();
            full[0] = r.total;
            Ok(draw(&full)?.f_narrow(0, r.start, shape[0])?)
        }
        _ => draw(shape),
    }
}

/// Mixes a seed and a counter into an independent seed (used to reseed libtorch each step).
pub fn derive_seed(seed: u64, counter: u64) -> u64 {
    let mut g = SplitMix64::new(seed ^ counter.wrapping_mul(0xD1B5_4A32_D192_ED03));
    g.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU the host draw is the draw the runs made before it existed (`randn_like`), so
    /// earlier results reproduce bit for bit.
    #[test]
    fn host_noise_on_the_cpu_is_randn_like() {
        let x = tch::Tensor::zeros([3, 1, 4, 4], (tch::Kind::Float, tch::Device::Cpu));
        tch::manual_seed(11);
        let a = x.randn_like();
        tch::manual_seed(11);
        let b = randn_like_on_host(&x).unwrap();
        assert!(a.equal(&b));
        assert_eq!(b.size(), x.size());
    }

    #[test]
    fn per_example_draws_under_rows_are_the_rows_of_the_global_draw() {
        // A draw that numbers its elements stands for a generator's: the same shape gives the same values
        // (and the test leaves libtorch's process-wide generator to the tests that train).
        let numbered = |s: &[i64]| tch::Tensor::arange(s.iter().product::<i64>(), (tch::Kind::Float, tch::Device::Cpu));
        let draw = |s: &[i64]| Ok(numbered(s).view(s));
        let whole = per_example(None, &[6, 2], draw).unwrap();
        let second_half = per_example(Some(Rows { start: 3, total: 6 }), &[3, 2], draw).unwrap();
        assert!(second_half.equal(&whole.narrow(0, 3, 3)));
        let alone = per_example(Some(Rows { start: 0, total: 6 }), &[6, 2], draw).unwrap();
        assert!(alone.equal(&whole), "a process holding the whole batch draws exactly that");
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        SplitMix64::new(7).shuffle(&mut a);
        SplitMix64::new(7).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn below_stays_in_range() {
        let mut g = SplitMix64::new(1);
        assert!((0..1000).all(|_| g.below(3) < 3));
    }
}
