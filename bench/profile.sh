#!/usr/bin/env bash
# Where the proxy's CPU goes per operation, measured in place: the same
# load and placement as bench/compare.sh (emulator on cpu1; load generator
# and sessionguard sharing cpu0; observe mode, every rule on), with `perf
# record` sampling the proxy process while the load runs. Prints, for each
# connection count, the proxy's CPU per operation split by layer (kernel,
# I/O runtime, data path, session engine, wire protocol, allocator and
# libc, metrics) and the top symbols. This is how docs/performance.md's
# "where the time goes" tables were made; it measures, it never judges.
#
# There are no hardware counters in this VM kind (no cache-miss counts):
# growth of a layer's time per operation with the number of connections,
# for the same code and work, is what shows its cache misses.
#
# Environment:
#   BENCH_CONNECTIONS="16 256"  BENCH_SECONDS=5  PROFILE_SECONDS=3
#   SESSIONGUARD_BIN, SESSIONGUARD_DEV_BIN  as for bench/compare.sh
#   PROFILE_IO=auto|io_uring|epoll          the proxy's proxy.io
#   PROFILE_KEEP=dir                        keep perf.data and reports there
set -euo pipefail

cd "$(dirname "$0")/.."
CONNECTIONS=${BENCH_CONNECTIONS:-"16 256"}
SECONDS_PER_POINT=${BENCH_SECONDS:-5}
PROFILE_SECONDS=${PROFILE_SECONDS:-3}
IO=${PROFILE_IO:-auto}

die() { echo "profile.sh: $*" >&2; exit 1; }
command -v perf >/dev/null || die "perf is missing (Debian: apt-get install linux-perf)"
command -v python3 >/dev/null || die "python3 is missing"
# shellcheck source=bench/common.sh
source "bench/common.sh"
bench_binaries
((SECONDS_PER_POINT > PROFILE_SECONDS)) || die "BENCH_SECONDS must exceed PROFILE_SECONDS"

bench_workdir "${PROFILE_KEEP:-}"

bench_two_core_placement
start_emulator 1

start_observe_proxy sessionguard "$IO" 0
P_SG=$SG_PORT PID_SG=$SG_PID

HZ=$(getconf CLK_TCK)

echo "# sessionguard bench/profile.sh — $(date -u +%FT%TZ)"
echo "# $(nproc) cpu ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')), Linux $(uname -r), proxy.io = $IO"
for conns in $CONNECTIONS; do
    data="$WORK/perf-$conns.data"
    # Sample the middle of the measured span only (after the 1 s warm-up).
    (sleep 1.5; perf record -F 4999 -g -p "$PID_SG" -o "$data" -- sleep "$PROFILE_SECONDS" >/dev/null 2>&1) &
    PERF_PID=$!
    before=$(cpu_ticks "$PID_SG")
    line=$(on 0 "$DEV_BIN" bench-load --target "127.0.0.1:$P_SG" --connections "$conns" \
        --duration "${SECONDS_PER_POINT}s" --warmup 1s) || die "bench-load failed at $conns connections"
    after=$(cpu_ticks "$PID_SG")
    wait "$PERF_PID" || die "perf record failed (perf_event_paranoid? run as root)"
    ops=$(sed -n 's/.*ops_per_sec=\([0-9.]*\).*/\1/p' <<<"$line")
    # CPU over warm-up + measurement, operations scaled to that span.
    us_per_op=$(python3 -c "print(f'{($after - $before) / $HZ * 1e6 / ($ops * ($SECONDS_PER_POINT + 1)):.2f}')")
    perf report -i "$data" --no-children -g none --sort dso,sym 2>/dev/null >"$WORK/report-$conns.txt"
    echo
    echo "## $conns connections: $line"
    echo "proxy cpu per operation: $us_per_op us"
    python3 - "$WORK/report-$conns.txt" "$us_per_op" <<'PY'
import collections, re, sys
report, us = sys.argv[1], float(sys.argv[2])
layers = collections.Counter()
top = []
for line in open(report):
    m = re.match(r"\s+([0-9.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
    if not m:
        continue
    share, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
    if kind == "k":
        layer = "kernel"
    elif "sessionguard_engine" in sym or "slab_map" in sym or "dashmap" in sym:
        layer = "engine"
    elif "sessionguard_protocol" in sym or "bson::" in sym:
        layer = "protocol"
    elif "sessionguard_proxy" in sym:
        layer = "data path"
    elif "monoio" in sym or "futures_util" in sym or "poll_fn" in sym or "tokio" in sym:
        layer = "runtime"
    elif "prometheus" in sym:
        layer = "metrics"
    elif dso.startswith("libc") or "alloc" in sym or "memmove" in sym or "memcpy" in sym:
        layer = "libc/alloc"
    else:
        layer = "other user space (hashing, std)"
    layers[layer] += share
    top.append((share, sym))
print(f"{'layer':32} {'share':>7} {'us/op':>7}")
for layer, share in layers.most_common():
    print(f"{layer:32} {share:6.1f}% {share * us / 100:7.2f}")
print("top symbols:")
for share, sym in sorted(top, reverse=True)[:12]:
    print(f"  {share:5.2f}%  {sym[:110]}")
PY
done
