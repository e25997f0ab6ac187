#!/usr/bin/env bash
# Runs sessionguard's cargo-fuzz targets (fuzz/) for a bounded time each:
# the frame decoder on raw bytes, the OP_MSG section parser, OP_COMPRESSED
# decompression (with a counting allocator: a bomb must be refused before
# it allocates beyond the limit) and the command view. Starts from the
# checked-in seeds (fuzz/corpus/<target>/seed-*); entries the fuzzer adds
# stay in the same directory, untracked. A crash leaves its input under
# fuzz/artifacts/<target>/ and makes this script exit 1: turn it into a
# regression test in the main crate (see docs/reliability.md).
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 60)
#   FUZZ_TARGETS    space-separated subset (default: all four)
#   FUZZ_SANITIZER  address | none (default none: sessionguard forbids
#                   unsafe code, so ASan mostly slows the run; use address
#                   to check the C decompressors too)
#
# libFuzzer needs nightly compiler flags. With a nightly toolchain
# installed (rustup) it is used; otherwise the stable compiler is asked to
# accept them with RUSTC_BOOTSTRAP=1. cargo-fuzz is installed from
# crates.io when missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
TARGETS="${FUZZ_TARGETS:-decode_frames op_msg_sections op_compressed command_view}"
SANITIZER="${FUZZ_SANITIZER:-none}"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== cargo install cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

TOOLCHAIN=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  TOOLCHAIN=(+nightly)
else
  echo "== no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
fi

cd "$ROOT/fuzz"
# Build every target once, then run the binaries: the run is of one fixed
# build, and later targets do not wait for a rebuild of a tree that moved.
echo "== cargo fuzz build (sanitizer $SANITIZER)"
cargo "${TOOLCHAIN[@]}" fuzz build --sanitizer "$SANITIZER" --debug-assertions
triple="$(rustc "${TOOLCHAIN[@]}" -vV | sed -n 's/^host: //p')"
bin_dir="target/$triple/release"

failed=()
for target in $TARGETS; do
  # Bombs need room: a few KiB of compressed input is what makes a
  # many-MiB payload.
  max_len=4096
  [[ "$target" == op_compressed ]] && max_len=65536
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "== $target: ${SECONDS_PER_TARGET}s (max_len $max_len)"
  log="artifacts/$target/last-run.log"
  status=0
  "$bin_dir/$target" "corpus/$target" \
    -artifact_prefix="artifacts/$target/" \
    -max_total_time="$SECONDS_PER_TARGET" -max_len="$max_len" \
    -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
  # The seed count, the final coverage line, the stats, and any failure.
  grep -E '^(INFO: seed corpus|#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs|stat::|==[0-9]+==|SUMMARY|thread .* panicked)' "$log" || true
  if [[ "$status" != 0 ]]; then
    echo "== $target FAILED (exit $status); full log: fuzz/$log" >&2
    grep -A20 -E 'panicked|ERROR: libFuzzer|==[0-9]+==ERROR' "$log" | head -40 >&2 || true
    failed+=("$target")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: all targets ran ${SECONDS_PER_TARGET}s without a crash"
