#!/bin/bash
# The runs behind docs/results/converge-*: baseline vs LISA where ControlNet converges slowly, and the
# baseline's learning-rate sweep. Every run is resumable: rerun the same command after an interruption.
#
#   scripts/converge.sh lane EXP SEED...      train seeds of one experiment, one after another (one core)
#   scripts/converge.sh arm EXP SEED ARM      one arm (baseline or lisa) of one seed, with the configuration
#                                             compare gives it: a seed's two arms on the two cores, after
#                                             which `lane EXP SEED` finds both finished and writes the summary
#   scripts/converge.sh control EXP SEED C    a control arm of one seed beside that experiment's baseline and
#                                             LISA, configured by configs/controls/NAME-C.toml: random,
#                                             condition or raw (the decoder regressing onto another target),
#                                             lr1.12 or lr1.25 (the baseline at a larger learning rate), sub8
#                                             (LISA on a sub-batch of 8), until2400 (LISA on the first 2,400
#                                             steps only), crossnorm and crossnorm-lisa (the rival: ControlNeXt's
#                                             cross-normalization in place of the zero convolutions, without and
#                                             with LISA)
#   scripts/converge.sh step-costs EXP        each arm's training-step cost at EXP's point, on an idle machine
#                                             (docs/results/NAME-controls/step-costs.json)
#   scripts/converge.sh contrast EXP          copies EXP's finished control arms into docs/results/NAME-controls
#                                             and times them against its baseline and LISA, per step and per
#                                             second (contrast.md there)
#   scripts/converge.sh sweep LR...           baseline-only runs of the learning-rate sweep (one core)
#   scripts/converge.sh aggregate EXP N       summary over seeds 0..N-1 of EXP (each must be finished)
#   scripts/converge.sh report-sweep          the sweep's table and plots
#   scripts/converge.sh reaggregate           rewrites every collected comparison's summary (docs/results/*/)
#                                             from its arms' committed summaries, with today's statistics
#   scripts/converge.sh report                every collected comparison's speed-ups side by side
#                                             (docs/results/converge-*, into docs/results/converge-speedups)
#
# Two lanes side by side use the two cores, e.g.
#   scripts/converge.sh lane i 0 2 4 &  scripts/converge.sh lane i 1 3 &  wait
# Training runs use a copy of the binary (runs/bin/lisa) so that rebuilding the project cannot disturb
# them; the reports (aggregate, report-sweep) only read finished runs and use the current build.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=runs/bin/lisa
if [ ! -x "$BIN" ]; then
  cargo build --release
  mkdir -p runs/bin && cp target/release/lisa "$BIN"
fi
report() { cargo run --release --quiet -- "$@"; }
# `--resume latest` for `lisa train` when run folder $1 holds a checkpoint (a fresh run refuses the flag).
resume_from() { RESUME=(); if ls "$1"/checkpoint-* >/dev/null 2>&1; then RESUME=(--resume latest); fi; }

# Every operating point is a configuration file read by lisa's strict loader: configs/NAME.toml per experiment
# (NAME is also its run folder's name), configs/controls/NAME-C.toml per control, configs/lr-sweep/ per rate.
# This script names configurations, seeds and arms; it sets no keys of its own but the seed.
# An experiment's configuration.
experiment() {
  case "$1" in
    i)            NAME=converge-edges ;;
    ii)           NAME=converge-edges-null ;;
    iii-mid)      NAME=converge-edges-mid ;;
    iii-down5)    NAME=converge-edges-down5 ;;
    iv-skeleton)  NAME=converge-skeleton ;;
    iv-mask)      NAME=converge-mask ;;
    v)            NAME=converge-edges-3e-5 ;;
    *) echo "unknown experiment $1 (i, ii, iii-mid, iii-down5, iv-skeleton, iv-mask, v)" >&2; exit 2 ;;
  esac
  CFG=configs/$NAME.toml
}

case "${1:-}" in
  lane)
    EXP=$2; experiment "$EXP"; shift 2
    for s in "$@"; do
      # The hook does not touch the baseline (bit-identical losses and fidelity), so the hook experiments
      # share experiment i's baselines instead of training them again.
      b=runs/converge-edges-s$s/seed-$s/baseline; d=runs/$NAME-s$s/seed-$s
      if [[ $EXP == iii-* && ! -e $d/baseline && -f $b/summary.json ]]; then
        mkdir -p "$d" && ln -s "../../converge-edges-s$s/seed-$s/baseline" "$d/baseline"
      fi
      "$BIN" compare --config "$CFG" --set train.seed="$s" --seeds 1 \
        --output-dir "runs/$NAME-s$s" --resume --quiet
    done ;;
  arm)
    EXP=$2; s=$3; experiment "$EXP"
    case "${4:-}" in
      baseline) B=(--baseline) ;;
      lisa)     B=() ;;
      *) echo "the arm is baseline or lisa" >&2; exit 2 ;;
    esac
    if [[ $EXP == iii-* && $4 == baseline ]]; then
      echo "experiment $EXP shares experiment i's baselines: run \`lane i $s\`" >&2; exit 2
    fi
    d=runs/$NAME-s$s/seed-$s/$4
    [ -f "$d/summary.json" ] && exit 0
    resume_from "$d"
    # compare.seeds=1 as in `lane`, so that the arm's config.toml is byte-identical to the one compare writes.
    "$BIN" train "${B[@]}" --config "$CFG" --set train.seed="$s" --set compare.seeds=1 \
      --output-dir "$d" "${RESUME[@]}" --quiet ;;
  control)
    # configs/controls/NAME-C.toml: the experiment's configuration with the control's one change.
    EXP=$2; s=$3; C=${4:-}; experiment "$EXP"
    CC=configs/controls/$NAME-$C.toml
    [ -f "$CC" ] || { echo "no control $C of $NAME: $(ls configs/controls/$NAME-*.toml 2>/dev/null | sed "s|.*/$NAME-||; s|\.toml$||" | tr '\n' ' ')" >&2; exit 2; }
    case "$C" in lr*) B=(--baseline) ;; *) B=() ;; esac   # a learning-rate control is the baseline's arm
    d=runs/$NAME-controls/seed-$s/$C
    [ -f "$d/summary.json" ] && exit 0
    resume_from "$d"
    "$BIN" train "${B[@]}" --config "$CC" --set train.seed="$s" --set compare.seeds=1 \
      --output-dir "$d" "${RESUME[@]}" --quiet ;;
  sweep)
    shift
    for lr in "$@"; do
      # Each rate's configuration: steps until the curve has flattened, and a schedule dense through the event.
      case "$lr" in
        1e-4) CFG=configs/converge-edges.toml ;;       # experiment i's; report-sweep reuses its seed-0 baseline
        3e-5) CFG=configs/converge-edges-3e-5.toml ;;  # experiment v's
        *)    CFG=configs/lr-sweep/lr-$lr.toml ;;
      esac
      [ -f "$CFG" ] || { echo "no configuration for lr $lr (configs/lr-sweep/)" >&2; exit 2; }
      d=runs/lr-sweep/lr-$lr
      [ -f "$d/summary.json" ] && continue
      resume_from "$d"
      "$BIN" train --baseline --config "$CFG" --output-dir "$d" "${RESUME[@]}" --quiet
    done ;;
  aggregate)
    experiment "$2"; n=$3; out=runs/$NAME
    mkdir -p "$out"
    for ((s = 0; s < n; s++)); do
      for arm in baseline lisa; do
        [ -f "runs/$NAME-s$s/seed-$s/$arm/summary.json" ] || { echo "seed $s ($arm) of $NAME is not finished" >&2; exit 1; }
      done
      [ -e "$out/seed-$s" ] || ln -s "../$NAME-s$s/seed-$s" "$out/seed-$s"
    done
    report compare --config "$CFG" --seeds "$n" --output-dir "$out" --resume --quiet ;;
  report-sweep)
    # lr 1e-4 is the baseline of experiment i, seed 0, and 3e-5 that of experiment v, seed 0, when it has run
    # (the same settings as the sweep's; the hook does not touch the baseline).
    for p in "1e-4 converge-edges" "3e-5 converge-edges-3e-5"; do
      set -- $p; b=runs/$2-s0/seed-0/baseline
      if [ ! -e "runs/lr-sweep/lr-$1" ] && [ -f "$b/summary.json" ]; then ln -s "../../$b" "runs/lr-sweep/lr-$1"; fi
    done
    report lr-sweep runs/lr-sweep ;;
  reaggregate)
    for d in docs/results/*/; do
      d=${d%/}
      [[ -d $d/seed-0 && ! -f $d/ablation.json ]] || continue
      # A main network trained by an earlier run is read from its shipped copy in assets/ (the arms are finished:
      # it is loaded, never run); without one the comparison is left as it is.
      main=$(sed -n 's/^main_network = "\(.*\)"$/\1/p' "$d/config.toml")
      M=()
      if [[ -n $main && ! -e $main/config.json ]]; then
        shipped=assets/$(basename "$(dirname "$main")")
        if [[ -e $shipped/config.json ]]; then M=(--set "main_network=\"$shipped\""); else
          echo "$d: its main network ($main) is not here; left as it is" >&2; continue; fi
      fi
      cp "$d/config.toml" "$d/config.toml.kept"
      report compare --config "$d/config.toml" "${M[@]}" --output-dir "$d" --resume --quiet >/dev/null
      mv "$d/config.toml.kept" "$d/config.toml"   # the configuration the arms ran with, not this command's
    done ;;
  step-costs)
    experiment "$2"; out=docs/results/$NAME-controls; mkdir -p "$out"
    report bench --config "$CFG" --reps 20 --warmup 2 --out "$out/step-costs.json" | tee "$out/step-costs.md" ;;
  contrast)
    experiment "$2"; out=docs/results/$NAME-controls
    for armdir in runs/$NAME-controls/seed-*/*/; do
      [ -f "$armdir/summary.json" ] || continue
      rel=${armdir#runs/$NAME-controls/}; mkdir -p "$out/$rel"
      cp "$armdir"/{config.toml,fidelity.csv,metrics.csv,summary.json} "$out/$rel"
    done
    C=(); [ -f "$out/step-costs.json" ] && C=(--step-costs "$out/step-costs.json")
    report contrast "docs/results/$NAME" "$out" "${C[@]}" --out "$out" >/dev/null
    # LISA on the rival's side network against the rival alone (crossnorm-lisa over crossnorm), once both ran.
    if compgen -G "$out/seed-*/crossnorm/summary.json" >/dev/null && compgen -G "$out/seed-*/crossnorm-lisa/summary.json" >/dev/null; then
      mkdir -p "$out/crossnorm"
      report contrast "docs/results/$NAME" "$out" "${C[@]}" --reference crossnorm --candidate crossnorm-lisa \
        --out "$out/crossnorm" >/dev/null
    fi ;;
  report)
    # Reads the collected comparisons (scripts/collect-results.sh), so the table can be regenerated from the
    # repository alone.
    dirs=()
    for e in i ii iii-mid iii-down5 iv-skeleton iv-mask v; do
      experiment "$e"; [ -f "docs/results/$NAME/summary.json" ] && dirs+=("docs/results/$NAME")
    done
    # The fast-learning-rate comparisons (lr 1e-3, configs/compare*.toml), whose events span few evaluations.
    for n in edges mask depth flow-edges flow-mask dit-edges dit-mask video-edges video-trajectory; do
      [ -f "docs/results/$n/summary.json" ] && dirs+=("docs/results/$n")
    done
    # Per-second speed-ups where a point runs the step the idle bench timed (`step-costs v`).
    K=(); k=docs/results/converge-edges-3e-5-controls/step-costs.json; [ -f "$k" ] && K=(--step-costs "$k")
    report speedups "${dirs[@]}" "${K[@]}" --out docs/results/converge-speedups ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
