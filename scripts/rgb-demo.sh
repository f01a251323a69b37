#!/bin/bash
# The colour run of the README's "Your own data": a colour imagefolder made from Fashion-MNIST
# (`lisa tinted-folder`), a colour main network pretrained on it, a classifier for its Fréchet distance,
# then baseline vs LISA with an extracted condition (edges, from the luminance) and with the folder's own
# condition images (masks, `given`), and the main network's own evaluation. Every step is skipped when its
# output exists, and training steps resume, so rerunning continues an interrupted run.
#   scripts/rgb-demo.sh [STEP...]   steps: folder main classifier edges given eval (default: all, in order)
set -euo pipefail
cd "$(dirname "$0")/.."
LISA=${LISA:-target/release/lisa}
[ -x "$LISA" ] || cargo build --release
DATA=(--set 'data.dataset="runs/tinted"' --set data.channels=3 --set 'data.caption_column=""')
resume() { ls "$1"/checkpoint-* >/dev/null 2>&1 && echo "--resume latest" || true; }
compare() {  # compare TASK-ARGS... : 300 steps at lr 1e-3 (configs/compare.toml), one seed, dense fidelity
  local out=$1; shift
  "$LISA" compare --config configs/compare.toml "$@" --steps 300 --seeds 1 --set fidelity.every_steps=25 \
    "${DATA[@]}" --set main_network='"runs/tinted-main/model"' --classifier runs/tinted-classifier \
    --output-dir "$out" --resume --quiet
}
for step in "${@:-folder main classifier edges given eval}"; do for s in $step; do case "$s" in
  folder) [ -f runs/tinted/metadata.jsonl ] || "$LISA" tinted-folder --out runs/tinted --count 6000 --seed 0 ;;
  main) [ -f runs/tinted-main/model/config.json ] ||
          "$LISA" pretrain --config configs/main-network.toml --output-dir runs/tinted-main "${DATA[@]}" \
            --set threads=1 --quiet $(resume runs/tinted-main) ;;   # the recipe's 8,000 steps
  classifier) [ -f runs/tinted-classifier/classifier.json ] ||
          "$LISA" classifier --data runs/tinted --out runs/tinted-classifier --epochs 10 --threads 1 \
            --set data.channels=3 --set 'data.caption_column=""' ;;
  edges) compare runs/tinted-edges --task edges ;;
  given) compare runs/tinted-given --task given --set 'given_kind="mask"' ;;
  eval) "$LISA" eval --model runs/tinted-main/model --classifier runs/tinted-classifier --num-images 500 \
          --out runs/tinted-main/eval.json ;;
  *) echo "unknown step $s (folder main classifier edges given eval)" >&2; exit 2 ;;
esac; done; done
