#!/usr/bin/env bash
# Crash test of `lisa pretrain`, with the CLI only: a tiny training run (a checkpoint every step) is killed
# with SIGKILL KILLS times at pseudo-random moments -- some timed, some the instant a checkpoint starts being
# written, some just after one is complete -- and continued each time with `--resume latest` (or started
# afresh while no checkpoint exists). It checks
#   after every kill: every checkpoint-N/ present is complete (state.json of step N, model, optimizer and
#                     EMA tensors) and loads (`lisa export` reads its config and weights), and nothing else
#                     is named like a checkpoint;
#   at the end:       the loss curve (metrics.csv, step by step) has each step once and equals that of an
#                     uninterrupted run with the same seed, the final weights are identical, and no
#                     temporary folder of a killed run is left.
#
#   bash scripts/crash-test.sh [KILLS] [SEED]     # defaults: 20 kills, seed 1
#   LISA=path/to/lisa bash scripts/crash-test.sh  # default binary: target/debug/lisa (built if missing)
#   KEEP=1 bash scripts/crash-test.sh             # keep the run folders (printed) for inspection
set -euo pipefail

KILLS=${1:-20}
SEED=${2:-1}
STEPS=${STEPS:-30}
cd "$(dirname "$0")/.."
LISA=${LISA:-target/debug/lisa}
if [ ! -x "$LISA" ]; then
    cargo build
fi

WORK=$(mktemp -d)
if [ "${KEEP:-0}" = 1 ]; then
    echo "run folders in $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi
CONFIG=$WORK/tiny.toml
cp tests/crash-run.toml "$CONFIG"

STRAIGHT=$WORK/straight
CRASHED=$WORK/crashed
fail() {
    echo "FAILED: $*" >&2
    exit 1
}

# (step,loss) rows of a run's metrics.csv.
losses() {
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "loss") c = i; next } { print $1 "," $c }' "$1/metrics.csv"
}

newest_checkpoint() {
    local n=0 d s
    for d in "$CRASHED"/checkpoint-*/; do
        [ -f "$d/state.json" ] || continue
        s=${d%/}
        s=${s##*/checkpoint-}
        [ "$s" -gt "$n" ] && n=$s
    done
    echo "$n"
}

declare -A VERIFIED=()
CHECKED=0
check_checkpoints() {
    local when=$1 d name step key
    for d in "$CRASHED"/checkpoint-*; do
        [ -e "$d" ] || continue
        name=${d##*/}
        step=${name#checkpoint-}
        [[ $step =~ ^[0-9]+$ ]] || continue
        [ -d "$d" ] || fail "$when: $d is not a folder"
        for f in state.json model.safetensors optimizer.safetensors ema.safetensors; do
            [ -s "$d/$f" ] || fail "$when: $d lacks $f"
        done
        grep -Eq "^  \"step\": $step,?$" "$d/state.json" || fail "$when: $d/state.json is not that of step $step"
        # A finished checkpoint never changes, so each one is loaded once.
        key="$name:$(stat -c %i "$d/state.json")"
        if [ -z "${VERIFIED[$key]:-}" ]; then
            rm -rf "$WORK/export"
            "$LISA" export --checkpoint "$d" --out "$WORK/export" > /dev/null 2> "$WORK/export.log" ||
                fail "$when: $d does not load: $(cat "$WORK/export.log")"
            VERIFIED[$key]=1
        fi
        CHECKED=$((CHECKED + 1))
    done
}

start() { # resume? log
    local resume=()
    [ "$1" = 1 ] && resume=(--resume latest)
    "$LISA" pretrain --quiet --config "$CONFIG" --output-dir "$CRASHED" --steps "$STEPS" "${resume[@]}" \
        > /dev/null 2> "$2" &
    PID=$!
}

alive() { kill -0 "$PID" 2> /dev/null; }

echo "uninterrupted run: $STEPS steps"
t0=$(date +%s.%N)
"$LISA" pretrain --quiet --config "$CONFIG" --output-dir "$STRAIGHT" --steps "$STEPS" > /dev/null 2> "$WORK/straight.log" ||
    fail "the uninterrupted run: $(cat "$WORK/straight.log")"
run_ms=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%d", (b - a) * 1000 }')
span_ms=$((run_ms / 2 < 1500 ? run_ms / 2 : 1500))
echo "  took $run_ms ms; timed kills fall in the first $span_ms ms of a run"

RANDOM=$SEED
in_write=0
fresh=0
early=0
for ((k = 1; k <= KILLS; k++)); do
    if [ "$(newest_checkpoint)" -gt 0 ]; then resume=1; else resume=0; fresh=$((fresh + 1)); fi
    before=$(newest_checkpoint)
    start "$resume" "$WORK/run-$k.log"
    mode=$((RANDOM % 10))
    if [ "$mode" -le 3 ]; then
        what="after $((ms = RANDOM % (span_ms + 1))) ms"
        sleep "$(awk -v m="$ms" 'BEGIN { printf "%.3f", m / 1000 }')"
    elif [ "$mode" -le 6 ]; then
        n=$((RANDOM % 3 + 1))
        what="as checkpoint write $n of this process starts"
        seen=0
        last=""
        while alive && [ "$seen" -lt "$n" ]; do
            for t in "$CRASHED"/.checkpoint-*.tmp-"$PID"; do
                if [ -e "$t" ] && [ "$t" != "$last" ]; then
                    seen=$((seen + 1))
                    last=$t
                fi
            done
        done
    else
        n=$((RANDOM % 2 + 1))
        what="just after checkpoint $((before + n)) is complete"
        while alive && [ "$(newest_checkpoint)" -lt $((before + n)) ]; do :; done
    fi
    if alive; then
        kill -KILL "$PID"
        wait "$PID" 2> /dev/null || true
        landed=""
        if compgen -G "$CRASHED/.checkpoint-*.tmp-$PID" > /dev/null; then
            landed=" (inside a checkpoint write)"
            in_write=$((in_write + 1))
        fi
        echo "kill $k: $what$landed; newest checkpoint now $(newest_checkpoint)"
    else
        wait "$PID" || fail "run $k failed: $(cat "$WORK/run-$k.log")"
        early=$((early + 1))
        echo "kill $k: the run finished before the kill ($what)"
    fi
    check_checkpoints "after kill $k"
done

echo "final run"
if [ "$(newest_checkpoint)" -gt 0 ]; then resume=1; else resume=0; fi
start "$resume" "$WORK/final.log"
wait "$PID" || fail "the final run: $(cat "$WORK/final.log")"
check_checkpoints "at the end"

leftovers=$(cd "$CRASHED" && compgen -G ".checkpoint-*" || true)
[ -z "$leftovers" ] || fail "temporary folders were left: $leftovers"
dups=$(losses "$CRASHED" | cut -d, -f1 | sort -n | uniq -d)
[ -z "$dups" ] || fail "metrics.csv has steps more than once: $dups"
[ "$(losses "$STRAIGHT" | wc -l)" = "$STEPS" ] || fail "the uninterrupted run did not log $STEPS steps"
diff <(losses "$STRAIGHT") <(losses "$CRASHED") > "$WORK/loss.diff" ||
    fail "the loss curves differ (uninterrupted < > killed and resumed):
$(cat "$WORK/loss.diff")"
cmp -s "$STRAIGHT/model/model.safetensors" "$CRASHED/model/model.safetensors" || fail "the final weights differ"

echo
echo "PASSED: $KILLS kills ($in_write inside a checkpoint write, $fresh fresh starts, $early runs finished before their kill)"
echo "  checked after every kill: $CHECKED checkpoint folders present (complete, state of the right step),"
echo "    ${#VERIFIED[@]} distinct checkpoints loaded with lisa export"
echo "  checked at the end: $STEPS loss values identical to the uninterrupted run, each step logged once,"
echo "    identical final weights, no temporary folders left"
