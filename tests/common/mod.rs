//! Fixtures shared by the integration tests (each test file includes this module with `mod common;`).
#![allow(dead_code)] // each test file uses its own subset

use std::process::Command;

pub mod golden;

/// Runs the built `lisa` binary with `args`: (exit status success, stdout, stderr).
pub fn lisa(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lisa")).args(args).output().expect("run lisa");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The multi-index of flat (row-major) index `i` in a tensor of `shape`, for naming the first mismatches.
pub fn unravel(mut i: i64, shape: &[i64]) -> Vec<i64> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d].max(1);
        i /= shape[d].max(1);
    }
    idx
}
