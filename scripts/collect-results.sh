#!/bin/bash
# Copies the outputs of `lisa compare` runs into docs/results/<task>/ for the repository:
# the summary (table + JSON), the plots, the sample grid, and each arm's fidelity and metric logs.
# usage: scripts/collect-results.sh runs/compare-edges [runs/compare-mask ...]
set -euo pipefail
cd "$(dirname "$0")/.."
for run in "$@"; do
  task=$(basename "$run"); task=${task#compare-}; task=${task#agg-}
  dest=docs/results/$task
  mkdir -p "$dest"
  for f in summary.md summary.json fidelity.png loss-gain.png lisa-ratio.png samples.png config.toml \
           disentangle.md disentangle.json disentangle.csv disentangle.png ablation.md ablation.json ablation-config.toml; do
    [ -f "$run/$f" ] && cp "$run/$f" "$dest/"
  done
  for armdir in "$run"/seed-*/*/; do
    [ -f "$armdir/summary.json" ] || continue
    rel=${armdir#"$run"/}
    mkdir -p "$dest/$rel"
    cp "$armdir"/{fidelity.csv,metrics.csv,summary.json} "$dest/$rel"
  done
  echo "collected $run → $dest"
done
