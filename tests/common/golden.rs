//! The golden-tensor comparator shared by the parity tests (llm.c style): every tensor compared is a row of a
//! table (shape, scale, largest difference, verdict); a mismatch names its first differing elements with their
//! indices; the test fails once, at the end, listing every mismatch.
use tch::{Device, Kind, Tensor};

use super::unravel;

/// Mismatching elements printed per tensor.
const SHOW: usize = 5;

/// When a tensor matches its reference.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// `max |ours − ref| ≤ abs · (1 + max |ref|)`.
    pub abs: f64,
    /// For tensors with `max |ref| < 1`, also `max |ours − ref| ≤ rel · max |ref|` (small tensors are held to
    /// their own scale, not to 1).
    pub rel_below_one: Option<f64>,
}

impl Tolerance {
    /// The largest difference allowed for a reference of scale `max |ref|`.
    pub fn bound(&self, scale: f64) -> f64 {
        let abs = self.abs * (1.0 + scale);
        match self.rel_below_one {
            Some(rel) if scale < 1.0 => abs.min(rel * scale),
            _ => abs,
        }
    }
}

/// Collects per-tensor comparisons; [`Report::finish`] prints the table and asserts.
pub struct Report {
    tol: Tolerance,
    rows: Vec<String>,
    failures: Vec<String>,
    /// (group, max abs diff, max abs diff / max|ref|) per tensor.
    stats: Vec<(String, f64, f64)>,
}

impl Report {
    /// An empty report judging with `tol`.
    pub fn new(tol: Tolerance) -> Self {
        Self { tol, rows: vec![], failures: vec![], stats: vec![] }
    }

    /// Compares `ours` with `reference` (in f64, on the CPU) under `name`.
    pub fn compare(&mut self, name: &str, ours: &Tensor, reference: &Tensor) {
        self.compare_in("", name, ours, reference)
    }

    /// [`Report::compare`] within `group` (a stage of the step: forward, loss, grad, ...), summarised per group.
    pub fn compare_in(&mut self, group: &str, name: &str, ours: &Tensor, reference: &Tensor) {
        let (o, r) = (ours.detach().to_device(Device::Cpu).to_kind(Kind::Double), reference.to_kind(Kind::Double));
        if o.size() != r.size() {
            self.rows.push(format!("{name:<72} SHAPE MISMATCH"));
            self.failures.push(format!("{name}: shape ours {:?}, reference {:?}", o.size(), r.size()));
            return;
        }
        let diff = (&o - &r).abs();
        let max_abs = diff.max().double_value(&[]);
        let scale = r.abs().max().double_value(&[]);
        let bound = self.tol.bound(scale);
        let rel = if scale > 0.0 { max_abs / scale } else { max_abs };
        let ok = max_abs <= bound && max_abs.is_finite();
        self.stats.push((group.to_string(), max_abs, rel));
        self.rows.push(format!(
            "{name:<72} {:>14} max|ref| {scale:<10.4e} max|diff| {max_abs:<10.3e} rel {rel:<10.3e} bound {bound:<9.2e} {}",
            format!("{:?}", o.size()),
            if ok { "ok" } else { "MISMATCH" }
        ));
        if ok {
            return;
        }
        let (flat_o, flat_r, flat_d) = (o.flatten(0, -1), r.flatten(0, -1), diff.flatten(0, -1));
        let shape = o.size();
        let bad = flat_d.gt(bound).nonzero().flatten(0, -1);
        let n_bad = bad.size()[0];
        let mut msg = format!(
            "{name} {shape:?}: max|diff| {max_abs:.3e} > bound {bound:.3e} (max|ref| {scale:.4e}); {n_bad} of {} \
             elements exceed it:",
            flat_o.size()[0]
        );
        for k in 0..(n_bad as usize).min(SHOW) {
            let i = bad.int64_value(&[k as i64]);
            let (a, b) = (flat_o.double_value(&[i]), flat_r.double_value(&[i]));
            let d = (a - b).abs();
            msg.push_str(&format!(
                "\n    at {:?}: ours {a:+.9e}  ref {b:+.9e}  abs {d:.3e}  rel {:.3e}",
                unravel(i, &shape),
                d / b.abs().max(f64::MIN_POSITIVE)
            ));
        }
        self.failures.push(msg);
    }

    /// Prints the table (and, where groups were named, the largest deviation per group), then fails the test if
    /// any tensor differed.
    pub fn finish(self) {
        println!("{}", self.rows.join("\n"));
        let mut groups: Vec<String> = self.stats.iter().map(|s| s.0.clone()).filter(|g| !g.is_empty()).collect();
        groups.dedup();
        if !groups.is_empty() {
            println!("\nmax deviation per group (abs, and abs / max|ref|):");
        }
        for g in &groups {
            let (a, r) =
                self.stats.iter().filter(|s| &s.0 == g).fold((0f64, 0f64), |(a, r), s| (a.max(s.1), r.max(s.2)));
            println!("  {g:<12} abs {a:.3e}   rel {r:.3e}");
        }
        assert!(
            self.failures.is_empty(),
            "{} tensor(s) differ from the reference:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}
