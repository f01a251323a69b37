//! `lisa ablate`: the baseline, LISA and its controls on one task, every arm with the same seeds,
//! initialisation, data order and evaluation noise, summarised in one table. The controls ask
//! whether LISA's gain (if any) comes from its target or from any auxiliary regression, decoder
//! capacity, hook position, weight or distance.
use serde::{Deserialize, Serialize};

use super::arm::ArmSummary;
use super::control_config::ControlConfig;
use super::study::{ArmAggregate, Study};
use crate::eval::curves::first_reaching;
use crate::eval::seeds::paired_difference;
use crate::{Error, Result};

/// One ablation arm: a name and the config overrides that make it (applied on top of LISA enabled).
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Folder and table name, e.g. `random-target`.
    pub name: String,
    /// `key=value` overrides, e.g. `lisa.target="random"`.
    pub overrides: Vec<String>,
}

impl Variant {
    /// Parses `name: key=value, key=value` (or a bare `name` with no overrides).
    pub fn parse(spec: &str) -> Result<Self> {
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let name = name.trim();
        if name.is_empty()
            || name == "baseline"
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(Error::Config(format!(
                "ablation variant {spec:?}: give `name: key=value, ...` with a name of letters, digits, '-', '_' or '.' \
                 (not `baseline`, which is always run)"
            )));
        }
        let overrides = rest.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        Ok(Self { name: name.into(), overrides })
    }
}

/// The default ablation arms (spec §7's controls): LISA itself, three other targets, a wider decoder,
/// cosine distance, λ ∈ {0.05, 0.1, 0.5, 1} (0.2 is `lisa`), and every hookable layer but `mid`:
/// `{hook}_0 .. {hook}_{num_hooks−1}` (`down` for a UNet side network, `block` for a transformer one).
pub fn default_variants(hook: &str, num_hooks: usize) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "lisa".into(),
        "random-target: lisa.target=\"random\"".into(),
        "raw-target: lisa.target=\"raw\"".into(),
        "condition-target: lisa.target=\"condition\"".into(),
        "decoder-2x-width: lisa.decoder_channel_multiplier=2".into(),
        "cosine: lisa.distance=\"cosine\"".into(),
    ];
    v.extend(["0.05", "0.1", "0.5", "1.0"].iter().map(|l| format!("lambda-{l}: lisa.lambda={l}")));
    v.extend((0..num_hooks).map(|i| format!("hook-{hook}_{i}: lisa.hook=\"{hook}_{i}\"")));
    v
}

/// One row of the ablation table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AblationRow {
    /// The arm.
    pub name: String,
    /// Its overrides.
    pub overrides: Vec<String>,
    /// The arm over seeds.
    pub aggregate: ArmAggregate,
    /// Final fidelity minus the baseline's, paired by seed: mean and standard deviation.
    pub final_vs_baseline: (f64, f64),
    /// mAUCC minus the baseline's, paired by seed.
    pub maucc_vs_baseline: (f64, f64),
    /// Baseline's last step over the first step this arm's mean curve reaches the baseline's final fidelity.
    pub speedup: Option<f64>,
    /// Step time over the baseline's, minus one, in percent.
    pub overhead_percent: f64,
}

/// The ablation's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AblationReport {
    /// The condition.
    pub condition: String,
    /// The fidelity metric.
    pub metric: String,
    /// The baseline.
    pub baseline: ArmAggregate,
    /// The other arms.
    pub rows: Vec<AblationRow>,
}

impl AblationReport {
    /// The table (Markdown), with the final Fréchet distance of each arm (— where it was skipped) and, with a
    /// classifier of the user's, its floor and ceiling.
    pub fn table(&self) -> String {
        let b = &self.baseline;
        let (bf, bfs) = b.mean_sd(|r| r.final_fidelity);
        let (ba, bas) = b.mean_sd(|r| r.mean_aucc);
        let mut s = format!(
            "condition `{}`, fidelity = {}, {} seed(s); differences are paired by seed (mean ± sd)\n\n\
             | arm | final fidelity | Δ final vs baseline | mAUCC | Δ mAUCC vs baseline | Fréchet distance | speed-up | step overhead | decoder parameters |\n\
             |---|---|---|---|---|---|---|---|---|\n\
             | baseline | {bf:.4} ± {bfs:.4} | | {ba:.4} ± {bas:.4} | | {} | | | 0 |\n",
            self.condition,
            self.metric,
            b.runs.len(),
            frechet_cell(b)
        );
        for r in &self.rows {
            let (f, fs) = r.aggregate.mean_sd(|x| x.final_fidelity);
            let (a, as_) = r.aggregate.mean_sd(|x| x.mean_aucc);
            s += &format!(
                "| {} | {f:.4} ± {fs:.4} | {:+.4} ± {:.4} | {a:.4} ± {as_:.4} | {:+.4} ± {:.4} | {} | {} | {:+.1}% | {} |\n",
                r.name,
                r.final_vs_baseline.0,
                r.final_vs_baseline.1,
                r.maucc_vs_baseline.0,
                r.maucc_vs_baseline.1,
                frechet_cell(&r.aggregate),
                r.speedup.map_or("not reached".into(), |x| format!("×{x:.2}")),
                r.overhead_percent,
                r.aggregate.runs[0].decoder_parameters
            );
        }
        let first = &b.runs[0];
        if let (Some(floor), Some(ceiling), Some(dir)) =
            (first.frechet_floor, first.frechet_ceiling, first.frechet_classifier.as_ref())
        {
            s += &format!(
                "\nFréchet distances on the features of the classifier in {dir}: real training images {floor:.2} \
                 (floor), uniform noise {ceiling:.2} (ceiling), as many images each, vs the same held-out images.\n"
            );
        }
        s
    }
}

/// An arm's final Fréchet distance over seeds (mean ± sd), or — where any run skipped it.
fn frechet_cell(arm: &ArmAggregate) -> String {
    if arm.runs.iter().any(|r| r.frechet.is_none()) {
        return "—".into();
    }
    let (m, sd) = arm.mean_sd(|r| r.frechet.unwrap_or(f64::NAN));
    format!("{m:.2} ± {sd:.2}")
}

/// Runs (or with `resume`, completes) the baseline and every variant for `cfg.compare.seeds` seeds into
/// `cfg.output_dir/seed-S/<arm>/`, then writes `ablation.md` and `ablation.json`. Arms finished by an earlier
/// `ablate` or `compare` in the same folder (`baseline`, `lisa`) are reused when resuming.
pub fn ablate(cfg: &ControlConfig, variants: &[Variant], resume: bool, quiet: bool) -> Result<AblationReport> {
    if variants.is_empty() {
        return Err(Error::Config("no ablation variants given".into()));
    }
    let mut study = Study::open(cfg, "ablation-config.toml", cfg, resume, quiet)?;
    let out = &cfg.output_dir;
    let mut arms: Vec<(String, Vec<String>, ControlConfig)> = vec![(
        "baseline".into(),
        vec![],
        ControlConfig { lisa: crate::control::LisaConfig { enabled: false, ..cfg.lisa.clone() }, ..cfg.clone() },
    )];
    for v in variants {
        let mut c = crate::config::with_overrides(cfg, &v.overrides)?;
        c.lisa.enabled = true;
        c.validate()?;
        arms.push((v.name.clone(), v.overrides.clone(), c));
    }
    let mut results: Vec<Vec<ArmSummary>> = vec![Vec::new(); arms.len()];
    for i in 0..cfg.compare.seeds {
        for (k, (name, _, arm_cfg)) in arms.iter().enumerate() {
            let mut c = arm_cfg.clone();
            c.train.seed = cfg.train.seed + i;
            c.output_dir = out.join(format!("seed-{}", c.train.seed)).join(name);
            let summary = study.run_arm(name, &c)?;
            results[k].push(summary);
        }
    }
    let mut it = arms.into_iter().zip(results);
    let (_, base_runs) = it.next().expect("the baseline is the first arm");
    let baseline = ArmAggregate::new("baseline", base_runs)?;
    let hib = baseline.runs[0].higher_is_better;
    let b_final = *baseline.mean.last().unwrap_or(&f64::NAN);
    let (bt, _) = baseline.mean_sd(|r| r.step_seconds);
    let last = *baseline.steps.last().unwrap_or(&0) as f64;
    let mut rows = Vec::new();
    for ((name, overrides, _), runs) in it {
        let agg = ArmAggregate::new(&name, runs)?;
        let (t, _) = agg.mean_sd(|r| r.step_seconds);
        rows.push(AblationRow {
            final_vs_baseline: paired_difference(&baseline.runs, &agg.runs, |r| r.final_fidelity),
            maucc_vs_baseline: paired_difference(&baseline.runs, &agg.runs, |r| r.mean_aucc),
            speedup: first_reaching(&agg.steps, &agg.mean, b_final, hib).filter(|&s| s > 0).map(|s| last / s as f64),
            overhead_percent: 100.0 * (t / bt - 1.0),
            name,
            overrides,
            aggregate: agg,
        });
    }
    let report =
        AblationReport { condition: cfg.condition.clone(), metric: baseline.runs[0].metric.clone(), baseline, rows };
    if !study.main_process {
        return Ok(report);
    }
    std::fs::write(out.join("ablation.md"), report.table()).map_err(|e| Error::io(out.join("ablation.md"), e))?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(out.join("ablation.json"), json).map_err(|e| Error::io(out.join("ablation.json"), e))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_each_arms_frechet_distance_and_the_classifiers_floor_and_ceiling() {
        let arm = |name: &str, frechet: [Option<f64>; 2], floor: Option<f64>| {
            let runs = (0..2)
                .map(|seed| ArmSummary {
                    arm: name.into(),
                    frechet: frechet[seed as usize],
                    frechet_floor: floor,
                    frechet_ceiling: floor.map(|x| x * 10.0),
                    frechet_classifier: floor.map(|_| "my-classifier".into()),
                    ..crate::experiments::arm::example_summary(seed, 0.5)
                })
                .collect();
            ArmAggregate::new(name, runs).unwrap()
        };
        let report = |baseline: ArmAggregate, other: ArmAggregate| AblationReport {
            condition: "edges".into(),
            metric: "edge_f1".into(),
            rows: vec![AblationRow {
                name: "lisa".into(),
                overrides: vec![],
                final_vs_baseline: (0.0, 0.0),
                maucc_vs_baseline: (0.0, 0.0),
                speedup: None,
                overhead_percent: 0.0,
                aggregate: other,
            }],
            baseline,
        };
        // Fréchet 10 and 12 over two seeds: 11 ± √2.
        let t = report(arm("baseline", [Some(10.0), Some(12.0)], Some(2.0)), arm("lisa", [Some(9.0), Some(9.0)], Some(2.0)))
            .table();
        assert!(t.contains("| Fréchet distance |") && t.contains("| 11.00 ± 1.41 |") && t.contains("| 9.00 ± 0.00 |"), "{t}");
        assert!(t.contains("my-classifier: real training images 2.00 (floor), uniform noise 20.00 (ceiling)"), "{t}");
        // Skipped in one run, the cell says so; no classifier of the user's, no floor line.
        let t = report(arm("baseline", [Some(10.0), None], None), arm("lisa", [Some(9.0), Some(9.0)], None)).table();
        assert!(t.contains("| baseline | 0.5000 ± 0.0000 | | 0.0000 ± 0.0000 | | — |") && !t.contains("(floor)"), "{t}");
    }

    #[test]
    fn variants_parse_and_apply_to_the_config() {
        let v = Variant::parse("random-target: lisa.target=\"random\", lisa.lambda=0.5").unwrap();
        assert_eq!(v.name, "random-target");
        let cfg = crate::config::with_overrides(&ControlConfig::default(), &v.overrides).unwrap();
        assert_eq!(cfg.lisa.target, crate::control::LisaTarget::Random);
        assert_eq!(cfg.lisa.lambda, 0.5);
        assert_eq!(Variant::parse("lisa").unwrap().overrides, Vec::<String>::new());
        assert!(Variant::parse("baseline").is_err() && Variant::parse("a b: x=1").is_err());
        let bad = Variant::parse("typo: lisa.lamda=1").unwrap();
        assert!(crate::config::with_overrides(&ControlConfig::default(), &bad.overrides).is_err());
        for spec in default_variants("down", 6) {
            let v = Variant::parse(&spec).unwrap();
            let c = crate::config::with_overrides(&ControlConfig::default(), &v.overrides).unwrap();
            c.validate().unwrap();
        }
    }
}
