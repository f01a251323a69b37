#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets/) for SECONDS seconds (default 600), growing fuzz/corpus/<target>/.
# A crash is saved by libFuzzer under fuzz/artifacts/<target>/; commit it: tests/fuzz_regressions.rs replays
# every corpus and artifact file on stable Rust. Needs the nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz
# Usage: bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(idx metadata_jsonl config checkpoint)
# The fuzz binaries are not built by our build.rs, which sets the rpath to libtorch for ours.
export LD_LIBRARY_PATH="$PWD/.libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd fuzz
cargo +nightly fuzz build --sanitizer none
for t in "${targets[@]}"; do
  echo "== $t: ${secs} s"
  # Without a sanitizer (the code under test is safe Rust; libFuzzer still catches panics, aborts, hangs and
  # runaway memory); -timeout: one input taking longer than 10 s counts as a hang.
  cargo +nightly fuzz run --sanitizer none "$t" "corpus/$t" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 \
    -print_final_stats=1 2>&1 | grep -E "^(Done|stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb|==|SUMMARY)|panicked|deadly signal|Test unit written" || true
  echo "   corpus: $(ls "corpus/$t" | wc -l) inputs; artifacts: $(ls "artifacts/$t" 2>/dev/null | wc -l)"
done
