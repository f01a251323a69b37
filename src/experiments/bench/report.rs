//! What `lisa bench` reports: step-time statistics, ratios side by side, peak RSS, the machine's GEMM rate,
//! and the table.
use serde::{Deserialize, Serialize};

use super::reference::ReferenceInfo;
use super::step::Variant;
use crate::eval::flops::StepFlops;

/// The median (mean of the middle two for an even count); NaN when empty.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The arithmetic mean; NaN when empty.
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Summary of one variant's step times, seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimingStats {
    /// Median step.
    pub median_s: f64,
    /// Mean step.
    pub mean_s: f64,
    /// Fastest step.
    pub min_s: f64,
    /// Slowest step.
    pub max_s: f64,
    /// Every timed step, in the order run.
    pub times_s: Vec<f64>,
}

impl TimingStats {
    /// The statistics of `times`.
    pub fn from_times(times: Vec<f64>) -> Self {
        Self {
            median_s: median(&times),
            mean_s: mean(&times),
            min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
            max_s: times.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            times_s: times,
        }
    }
}

/// One row of the results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantResult {
    /// Which step.
    pub variant: Variant,
    /// Its row label.
    pub label: String,
    /// Step times.
    pub stats: TimingStats,
    /// `batch / median step`.
    pub samples_per_s: f64,
    /// Counted FLOPs of one step, 10⁹ (see [`StepFlops`]).
    pub gflop_per_step: f64,
    /// `gflop_per_step / median step`.
    pub achieved_gflops: f64,
}

impl VariantResult {
    /// The row of `variant` from its step times.
    pub fn new(variant: Variant, times: Vec<f64>, batch: i64, gflop_per_step: f64) -> Self {
        let stats = TimingStats::from_times(times);
        Self {
            variant,
            label: variant.label().into(),
            samples_per_s: batch as f64 / stats.median_s,
            achieved_gflops: gflop_per_step / stats.median_s,
            gflop_per_step,
            stats,
        }
    }
}

/// A ratio of medians and the ratio of means.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// `median(a) / median(b)`.
    pub median: f64,
    /// `mean(a) / mean(b)`.
    pub mean: f64,
}

/// Ours against the reference, and LISA against its baseline (`None` where a variant is missing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparisons {
    /// Our baseline step / the reference's.
    pub ours_over_reference_baseline: Option<Ratio>,
    /// Our LISA step (shared encoder) / the reference's LISA step.
    pub ours_shared_over_reference_lisa: Option<Ratio>,
    /// Our LISA step (full second forward, the reference's algorithm) / the reference's LISA step.
    pub ours_full_over_reference_lisa: Option<Ratio>,
    /// Our LISA (shared encoder) / our baseline − 1.
    pub lisa_overhead_ours_shared: Option<Ratio>,
    /// Our LISA (full second forward) / our baseline − 1.
    pub lisa_overhead_ours_full: Option<Ratio>,
    /// Our LISA with the term on a sub-batch / the reference's LISA step.
    #[serde(default)]
    pub ours_sub_batch_over_reference_lisa: Option<Ratio>,
    /// Our LISA with the term on a sub-batch / our baseline − 1.
    #[serde(default)]
    pub lisa_overhead_ours_sub_batch: Option<Ratio>,
    /// The reference's LISA / its baseline − 1.
    pub lisa_overhead_reference: Option<Ratio>,
}

impl Comparisons {
    /// The ratios between the rows of `results`.
    pub fn from_results(results: &[VariantResult]) -> Self {
        let get = |v: Variant| results.iter().find(|r| r.variant == v).map(|r| &r.stats);
        let ratio = |a: Variant, b: Variant| match (get(a), get(b)) {
            (Some(a), Some(b)) => Some(Ratio { median: a.median_s / b.median_s, mean: a.mean_s / b.mean_s }),
            _ => None,
        };
        let overhead =
            |a: Variant, b: Variant| ratio(a, b).map(|r| Ratio { median: r.median - 1.0, mean: r.mean - 1.0 });
        use Variant::*;
        Self {
            ours_over_reference_baseline: ratio(OursBaseline, ReferenceBaseline),
            ours_shared_over_reference_lisa: ratio(OursLisaShared, ReferenceLisa),
            ours_full_over_reference_lisa: ratio(OursLisaFull, ReferenceLisa),
            lisa_overhead_ours_shared: overhead(OursLisaShared, OursBaseline),
            lisa_overhead_ours_full: overhead(OursLisaFull, OursBaseline),
            ours_sub_batch_over_reference_lisa: ratio(OursLisaSubBatch, ReferenceLisa),
            lisa_overhead_ours_sub_batch: overhead(OursLisaSubBatch, OursBaseline),
            lisa_overhead_reference: overhead(ReferenceLisa, ReferenceBaseline),
        }
    }
}

/// `VmHWM` (peak resident set size, KiB) from the text of `/proc/<pid>/status`.
pub fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// This process's peak resident set size, KiB (`VmHWM` of `/proc/self/status`; `None` off Linux).
pub fn peak_rss_kib() -> Option<u64> {
    parse_vm_hwm_kib(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn fmt_kib(kib: Option<u64>) -> String {
    match kib {
        None => "—".into(),
        Some(k) if k >= 1 << 20 => format!("{:.2} GiB", k as f64 / (1u64 << 20) as f64),
        Some(k) => format!("{:.0} MiB", k as f64 / 1024.0),
    }
}

// ------------------------------------------------------------------------------------------------
// The reference process

// The benchmark

/// The machine's matmul rate, measured in the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmResult {
    /// `n` of the `n×n · n×n` f32 matmul.
    pub size: i64,
    /// Timed matmuls (one per round, interleaved with the steps).
    pub stats: TimingStats,
    /// `2n³ / median`, 10⁹/s.
    pub median_gflops: f64,
    /// `2n³ / fastest`, 10⁹/s.
    pub best_gflops: f64,
}

/// Everything `lisa bench` measured (`--out` writes it as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The main network's folder.
    pub main_network: String,
    /// Its parameters (frozen).
    pub main_parameters: i64,
    /// Trainable parameters of the side network.
    pub side_parameters: i64,
    /// Trainable parameters of the LISA decoder.
    pub decoder_parameters: i64,
    /// Examples per step.
    pub batch: i64,
    /// Examples per step that get the LISA term in the sub-batch variant.
    #[serde(default)]
    pub lisa_sub_batch: i64,
    /// libtorch threads (both processes).
    pub threads: i32,
    /// Timed steps per variant.
    pub reps: usize,
    /// Untimed rounds before them.
    pub warmup: usize,
    /// What the steps are fed.
    pub inputs: String,
    /// How the variants' steps were ordered.
    pub interleaving: String,
    /// The malloc settings both processes ran under (see [`crate::allocator`]).
    #[serde(default)]
    pub allocator: String,
    /// One row per variant that ran.
    pub variants: Vec<VariantResult>,
    /// Ratios between them.
    pub comparisons: Comparisons,
    /// Forward FLOPs per sample of the step's parts.
    pub flops: StepFlops,
    /// How they are counted.
    pub flop_note: String,
    /// The GEMM rate.
    pub gemm: GemmResult,
    /// Peak RSS of our process (all four of our variants live in it), KiB.
    pub peak_rss_kib: Option<u64>,
    /// The reference.
    pub reference: ReferenceInfo,
}

impl BenchReport {
    /// The row of `variant`, if it ran.
    pub fn variant(&self, variant: Variant) -> Option<&VariantResult> {
        self.variants.iter().find(|r| r.variant == variant)
    }

    /// The printed report: settings, a table per variant, the comparisons, memory, GEMM and FLOP rates.
    pub fn table(&self) -> String {
        let mut s = format!(
            "lisa bench: batch {}, {} thread(s), {} timed step(s) per variant after {} warm-up round(s)\n\
             main network {} ({} parameters, frozen); side network {} trainable parameters, LISA decoder {}\n\
             inputs: {}\nordering: {}\nallocator: {}\n",
            self.batch,
            self.threads,
            self.reps,
            self.warmup,
            self.main_network,
            self.main_parameters,
            self.side_parameters,
            self.decoder_parameters,
            self.inputs,
            self.interleaving,
            self.allocator,
        );
        match self.reference.status.as_str() {
            "skipped" => {
                s += &format!("reference skipped: {}\n", self.reference.reason.as_deref().unwrap_or("unknown reason"))
            }
            "disabled" => s += "reference not run (--no-reference)\n",
            _ => {
                let h = self.reference.header.as_ref();
                let field = |k: &str| h.and_then(|h| h.get(k)).and_then(|v| v.as_str()).unwrap_or("?").to_string();
                s += &format!(
                    "reference: bench/reference.py, torch {}, diffusers {}\n",
                    field("torch"),
                    field("diffusers")
                );
            }
        }
        s += "\n| variant | median step | mean step | min – max | samples/s (median) | GFLOP/step | achieved GFLOP/s |\n\
              |---|---|---|---|---|---|---|\n";
        for r in &self.variants {
            let t = &r.stats;
            s += &format!(
                "| {} | {:.3} s | {:.3} s | {:.3} – {:.3} s | {:.1} | {:.1} | {:.1} |\n",
                r.label, t.median_s, t.mean_s, t.min_s, t.max_s, r.samples_per_s, r.gflop_per_step, r.achieved_gflops
            );
        }
        let c = &self.comparisons;
        let ratio = |r: Option<Ratio>| r.map_or("—".to_string(), |r| format!("{:.3} | {:.3}", r.median, r.mean));
        let pct = |r: Option<Ratio>| {
            r.map_or("—".to_string(), |r| format!("{:+.1}% | {:+.1}%", 100.0 * r.median, 100.0 * r.mean))
        };
        s += "\n| comparison | of medians | of means |\n|---|---|---|\n";
        s += &format!("| ours / reference, baseline step | {} |\n", ratio(c.ours_over_reference_baseline));
        s += &format!(
            "| ours / reference, LISA step (ours: shared encoder) | {} |\n",
            ratio(c.ours_shared_over_reference_lisa)
        );
        s += &format!(
            "| ours / reference, LISA step (ours: full 2nd forward) | {} |\n",
            ratio(c.ours_full_over_reference_lisa)
        );
        s +=
            &format!("| LISA overhead over baseline, ours (shared encoder) | {} |\n", pct(c.lisa_overhead_ours_shared));
        s +=
            &format!("| LISA overhead over baseline, ours (full 2nd forward) | {} |\n", pct(c.lisa_overhead_ours_full));
        s += &format!(
            "| ours / reference, LISA step (ours: LISA term on {} of {}) | {} |\n",
            self.lisa_sub_batch,
            self.batch,
            ratio(c.ours_sub_batch_over_reference_lisa)
        );
        s += &format!(
            "| LISA overhead over baseline, ours (LISA term on {} of {}) | {} |\n",
            self.lisa_sub_batch,
            self.batch,
            pct(c.lisa_overhead_ours_sub_batch)
        );
        s += &format!("| LISA overhead over baseline, reference | {} |\n", pct(c.lisa_overhead_reference));
        s += &format!(
            "\npeak RSS: ours {} (one process holding all four of our variants), reference {} (one process, \
             both its arms)\n",
            fmt_kib(self.peak_rss_kib),
            fmt_kib(self.reference.peak_rss_kib)
        );
        let g = &self.gemm;
        s += &format!(
            "GEMM {n}×{n}×{n} f32 on {} thread(s), in this run: median {:.1} GFLOP/s (best {:.1}, {} timed)",
            self.threads,
            g.median_gflops,
            g.best_gflops,
            g.stats.times_s.len(),
            n = g.size
        );
        if let Some(b) = self.variant(Variant::OursBaseline) {
            s += &format!(
                "; our baseline step reaches {:.0}% of the median GEMM rate",
                100.0 * b.achieved_gflops / g.median_gflops
            );
        }
        s += &format!(".\n{}.\n", self.flop_note);
        if !self.flops.unrecognised.is_empty() {
            s += &format!("(not counted, unrecognised: {})\n", self.flops.unrecognised.join(", "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::flops::FLOP_NOTE;
    use crate::experiments::bench::{allocator_settings, INPUTS};

    #[test]
    fn vm_hwm_parses() {
        let status = "Name:\tlisa\nVmPeak:\t  9000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(123456));
        assert_eq!(parse_vm_hwm_kib("Name: x\n"), None);
        assert!(peak_rss_kib().unwrap_or(1) > 0);
    }

    #[test]
    fn median_mean_and_stats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(mean(&[1.0, 2.0, 6.0]), 3.0);
        let s = TimingStats::from_times(vec![2.0, 1.0, 4.0]);
        assert_eq!((s.median_s, s.mean_s, s.min_s, s.max_s), (2.0, 7.0 / 3.0, 1.0, 4.0));
        assert_eq!(s.times_s, vec![2.0, 1.0, 4.0], "times keep their order");
    }

    fn row(v: Variant, times: &[f64]) -> VariantResult {
        VariantResult::new(v, times.to_vec(), 32, 100.0)
    }

    fn report(variants: Vec<VariantResult>, reference: ReferenceInfo) -> BenchReport {
        BenchReport {
            main_network: "m".into(),
            main_parameters: 10,
            side_parameters: 5,
            decoder_parameters: 1,
            batch: 32,
            lisa_sub_batch: 8,
            threads: 1,
            reps: 3,
            warmup: 1,
            inputs: INPUTS.into(),
            interleaving: "round-robin".into(),
            allocator: allocator_settings(true),
            comparisons: Comparisons::from_results(&variants),
            variants,
            flops: StepFlops { side: 1.0, main_encoder: 1.0, main_up: 1.0, decoder: 1.0, unrecognised: vec![] },
            flop_note: FLOP_NOTE.into(),
            gemm: GemmResult {
                size: 8,
                stats: TimingStats::from_times(vec![0.5]),
                median_gflops: 400.0,
                best_gflops: 400.0,
            },
            peak_rss_kib: Some(3 << 20),
            reference,
        }
    }

    #[test]
    fn ratios_overheads_and_the_table() {

        let variants = vec![
            row(Variant::OursBaseline, &[1.0, 1.0, 4.0]),
            row(Variant::OursLisaShared, &[1.25, 1.25, 1.25]),
            row(Variant::OursLisaFull, &[1.5, 1.5, 1.5]),
            row(Variant::ReferenceBaseline, &[2.0, 2.0, 2.0]),
            row(Variant::ReferenceLisa, &[3.0, 3.0, 3.0]),
        ];
        assert_eq!(variants[0].samples_per_s, 32.0);
        assert_eq!(variants[0].achieved_gflops, 100.0);
        let c = Comparisons::from_results(&variants);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let r = c.ours_over_reference_baseline.unwrap();
        assert!(close(r.median, 0.5) && close(r.mean, 1.0), "{r:?}");
        assert!(close(c.ours_shared_over_reference_lisa.unwrap().median, 1.25 / 3.0));
        assert!(close(c.ours_full_over_reference_lisa.unwrap().median, 0.5));
        assert!(close(c.lisa_overhead_ours_shared.unwrap().median, 0.25));
        assert!(close(c.lisa_overhead_ours_shared.unwrap().mean, 1.25 / 2.0 - 1.0));
        assert!(close(c.lisa_overhead_ours_full.unwrap().median, 0.5));
        assert!(close(c.lisa_overhead_reference.unwrap().median, 0.5));

        let ran = ReferenceInfo {
            status: "ran".into(),
            reason: None,
            header: Some(serde_json::json!({"torch": "2.13", "diffusers": "0.42"})),
            peak_rss_kib: Some(512 * 1024),
        };
        let t = report(variants.clone(), ran).table();
        for want in [
            "| ours, baseline | 1.000 s | 2.000 s | 1.000 – 4.000 s | 32.0 | 100.0 | 100.0 |",
            "| ours / reference, baseline step | 0.500 | 1.000 |",
            "| LISA overhead over baseline, ours (shared encoder) | +25.0% | -37.5% |",
            "| LISA overhead over baseline, reference | +50.0% | +50.0% |",
            "peak RSS: ours 3.00 GiB",
            "reference 512 MiB",
            "median 400.0 GFLOP/s",
            "reaches 25% of the median GEMM rate",
            "torch 2.13, diffusers 0.42",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }

        // Without the reference: its comparisons are dashes and the reason is printed.
        let ours: Vec<VariantResult> = variants.into_iter().filter(|r| r.variant.is_ours()).collect();
        let skipped = ReferenceInfo {
            status: "skipped".into(),
            reason: Some("no Python at x".into()),
            header: None,
            peak_rss_kib: None,
        };
        let rep = report(ours, skipped);
        assert!(rep.comparisons.ours_over_reference_baseline.is_none());
        assert!(rep.comparisons.lisa_overhead_ours_full.is_some());
        let t = rep.table();
        assert!(
            t.contains("reference skipped: no Python at x") && t.contains("| ours / reference, baseline step | — |"),
            "{t}"
        );
        let json = serde_json::to_string(&rep).unwrap();
        assert_eq!(serde_json::from_str::<BenchReport>(&json).unwrap(), rep);
    }

}
