//! A deterministic, resumable order of mini-batches. Epoch `e` visits the examples in the order of
//! a permutation drawn from `SplitMix64::new(derive_seed(seed, e))`, so the whole order is a pure
//! function of `(seed, epoch, position)` and a checkpoint only needs [`DataOrderState`].
use serde::{Deserialize, Serialize};

use crate::rng::{derive_seed, SplitMix64};
use crate::{Error, Result};

/// Where a [`DataOrder`] stands: enough, with the seed and dataset size, to resume it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataOrderState {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Number of examples of the current epoch's permutation already handed out.
    pub position: u64,
}

/// Hands out mini-batches of example indices over `0..n`, epoch after epoch.
///
/// A batch never straddles two epochs: when fewer than `batch_size` examples remain in the
/// current epoch, they are dropped and the batch is taken from the start of the next epoch. This
/// keeps every batch the same size and every epoch's batches a partition of one permutation.
#[derive(Debug, Clone)]
pub struct DataOrder {
    n: usize,
    seed: u64,
    epoch: u64,
    position: usize,
    perm: Vec<i64>,
}

impl DataOrder {
    /// An order over `n` examples (`n > 0`) seeded with `seed`, starting at epoch 0.
    pub fn new(n: usize, seed: u64) -> Result<Self> {
        if n == 0 {
            return Err(Error::Config(
                "cannot order batches over an empty dataset".into(),
            ));
        }
        Ok(Self {
            n,
            seed,
            epoch: 0,
            position: 0,
            perm: permutation(n, seed, 0),
        })
    }

    /// Number of examples ordered.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: an order has at least one example.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of full batches of `batch_size` per epoch (the remainder is dropped).
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.n / batch_size.max(1)
    }

    /// The next `batch_size` indices, moving to the next epoch first if the current one has fewer
    /// than `batch_size` left. Errors if `batch_size` is 0 or larger than the dataset.
    pub fn next_batch(&mut self, batch_size: usize) -> Result<Vec<i64>> {
        if batch_size == 0 || batch_size > self.n {
            return Err(Error::Config(format!(
                "batch size {batch_size} must be between 1 and the dataset size {}",
                self.n
            )));
        }
        if self.position + batch_size > self.n {
            self.epoch += 1;
            self.position = 0;
            self.perm = permutation(self.n, self.seed, self.epoch);
        }
        let batch = self.perm[self.position..self.position + batch_size].to_vec();
        self.position += batch_size;
        Ok(batch)
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> DataOrderState {
        DataOrderState {
            epoch: self.epoch,
            position: self.position as u64,
        }
    }

    /// Resumes from a saved state (same `n` and seed assumed). Errors if the position is past `n`.
    pub fn restore(&mut self, state: DataOrderState) -> Result<()> {
        if state.position > self.n as u64 {
            return Err(Error::Config(format!(
                "data order position {} is past the dataset size {}",
                state.position, self.n
            )));
        }
        if state.epoch != self.epoch {
            self.perm = permutation(self.n, self.seed, state.epoch);
        }
        self.epoch = state.epoch;
        self.position = state.position as usize;
        Ok(())
    }
}

fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<i64> {
    let mut perm: Vec<i64> = (0..n as i64).collect();
    SplitMix64::new(derive_seed(seed, epoch)).shuffle(&mut perm);
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_continues_identically() {
        let mut a = DataOrder::new(10, 42).unwrap();
        for _ in 0..5 {
            a.next_batch(3).unwrap(); // crosses an epoch boundary (3 batches per epoch)
        }
        let saved = serde_json::to_string(&a.state()).unwrap();
        let mut b = DataOrder::new(10, 42).unwrap();
        b.restore(serde_json::from_str(&saved).unwrap()).unwrap();
        for _ in 0..7 {
            assert_eq!(a.next_batch(3).unwrap(), b.next_batch(3).unwrap());
        }
        assert_eq!(a.state(), b.state());
    }

    #[test]
    fn epochs_are_permutations_without_straddling() {
        let mut o = DataOrder::new(10, 1).unwrap();
        let mut first: Vec<i64> = (0..3).flat_map(|_| o.next_batch(3).unwrap()).collect();
        assert_eq!(o.epoch(), 0);
        let next = o.next_batch(3).unwrap();
        assert_eq!((o.epoch(), o.state().position), (1, 3));
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 9);
        assert_ne!(next, permutation(10, 1, 0)[..3].to_vec());
        assert!(o.next_batch(0).is_err() && o.next_batch(11).is_err());
        assert!(DataOrder::new(0, 1).is_err());
        assert!(o
            .restore(DataOrderState {
                epoch: 0,
                position: 11
            })
            .is_err());
    }
}
