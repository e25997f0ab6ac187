#!/usr/bin/env bash
# Before and after of a data-path change, in same-run pairs: the measure of a
# change, where bench/compare.sh measures where the targets stand (see
# docs/performance.md). Two sessionguard binaries, A (before) and B (after),
# each a proxy in front of one emulator with compare.sh's two-core placement
# (emulator on cpu1, load generator and proxy sharing cpu0). Each pair runs
# the same load through A and through B back to back (B first in every other
# pair, so drift and order reach both alike), at one connection count.
#
# For every pair it prints, for A and B: operations per second, the proxy's
# CPU per operation, the load generator's, and their sum (what the shared
# core pays per operation; throughput follows it). Then, per measure, the
# mean, smallest and largest difference B - A, and in how many pairs B was
# lower: a change is real when the differences agree in sign, not when one
# run says so.
#
# usage: bench/pairs.sh A_BIN [B_BIN]
#   B_BIN defaults to a release build of this checkout.
# Environment:
#   PAIRS=6                    pairs
#   PAIRS_CONNECTIONS=256      load connections
#   PAIRS_INSPECT=true         false: both proxies with proxy.inspect = false
#   PAIRS_IO=auto              proxy.io of both proxies
#   BENCH_SECONDS=5            measured seconds per run (after BENCH_WARMUP=1)
#   SESSIONGUARD_DEV_BIN=path  the emulator and load generator (default:
#                              sessionguard-dev next to B_BIN)
set -euo pipefail

cd "$(dirname "$0")/.."
die() { echo "pairs.sh: $*" >&2; exit 1; }
(($# >= 1 && $# <= 2)) || die "usage: bench/pairs.sh A_BIN [B_BIN]"
A_BIN=$1
PAIRS=${PAIRS:-6}
CONNS=${PAIRS_CONNECTIONS:-256}
INSPECT=${PAIRS_INSPECT:-true}
IO=${PAIRS_IO:-auto}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
WARMUP=${BENCH_WARMUP:-1}
[[ "$PAIRS" =~ ^[1-9][0-9]*$ ]] || die "PAIRS must be a positive number"
[[ "$CONNS" =~ ^[1-9][0-9]*$ ]] || die "PAIRS_CONNECTIONS must be a positive number"
[[ "$INSPECT" == true || "$INSPECT" == false ]] || die "PAIRS_INSPECT must be true or false"
[[ -x "$A_BIN" ]] || die "no sessionguard binary at $A_BIN"

# shellcheck source=bench/common.sh
source "bench/common.sh"
[[ -n "${2:-}" ]] && SESSIONGUARD_BIN=$2
bench_binaries
B_BIN=$BIN

bench_workdir ""
bench_two_core_placement
start_emulator 1
start_observe_proxy A "$IO" 0 "$A_BIN" "$INSPECT"
declare -A PORT=([A]=$SG_PORT) PID=([A]=$SG_PID)
start_observe_proxy B "$IO" 0 "$B_BIN" "$INSPECT"
PORT[B]=$SG_PORT PID[B]=$SG_PID
HZ=$(getconf CLK_TCK)

echo "# sessionguard bench/pairs.sh — $(date -u +%FT%TZ)"
echo "# $(nproc) cpu, Linux $(uname -r); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# A: $A_BIN"
echo "# B: $B_BIN"
echo "# $PAIRS pairs at $CONNS connections, ${SECONDS_PER_RUN}s per run after ${WARMUP}s warm-up," \
    "proxy.inspect = $INSPECT, proxy.io = $IO"
echo
printf '%-5s %-3s %9s %11s %11s %11s\n' pair bin ops/s proxy_us/op load_us/op sum_us/op

# One run through proxy $1: "ops/s proxy_us/op load_us/op".
run() {
    local before line ticks ops
    before=$(cpu_ticks "${PID[$1]}")
    line=$(on 0 "$DEV_BIN" bench-load --target "127.0.0.1:${PORT[$1]}" --connections "$CONNS" \
        --duration "${SECONDS_PER_RUN}s" --warmup "${WARMUP}s") || die "bench-load failed through $1"
    ticks=$(($(cpu_ticks "${PID[$1]}") - before))
    ops=$(field "$line" ops)
    [[ -n "$ops" && "$ops" != 0 ]] || die "no operations through $1: $line"
    # The warm-up's operations are not in ops but used CPU: scaled as
    # compare.sh does.
    awk -v t="$ticks" -v hz="$HZ" -v ops="$ops" -v w="$WARMUP" -v d="$SECONDS_PER_RUN" \
        -v rate="$(field "$line" ops_per_sec)" -v load="$(field "$line" load_cpu_us_per_op)" \
        'BEGIN { printf "%s %.2f %s\n", rate, t / hz * 1e6 / (ops * (w + d) / d), (load == "" ? "-" : load) }'
}

RESULTS=$WORK/results
for ((pair = 1; pair <= PAIRS; pair++)); do
    order="A B"
    ((pair % 2 == 0)) && order="B A"
    for bin in $order; do
        # An assignment, so a failed run (its `die`) stops the script.
        result=$(run "$bin")
        read -r rate proxy load <<<"$result"
        echo "$pair $bin $rate $proxy $load" >>"$RESULTS"
        awk -v p="$pair" -v b="$bin" -v r="$rate" -v c="$proxy" -v l="$load" \
            'BEGIN { printf "%-5s %-3s %9d %11.2f %11s %11s\n", p, b, r, c, l, (l == "-" ? "-" : sprintf("%.2f", c + l)) }'
    done
done

echo
awk '
    { v[$1, $2, "ops"] = $3; v[$1, $2, "proxy"] = $4; v[$1, $2, "load"] = $5
      v[$1, $2, "sum"] = ($5 == "-" ? "-" : $4 + $5); pairs = ($1 > pairs ? $1 : pairs) }
    END {
        printf "%-11s %10s %10s %10s %10s %12s\n", "B - A", "mean", "smallest", "largest", "mean %", "B lower in"
        n = split("ops proxy load sum", measures, " ")
        for (m = 1; m <= n; m++) {
            k = measures[m]; sum = 0; base = 0; lower = 0; count = 0
            for (p = 1; p <= pairs; p++) {
                if (v[p, "A", k] == "-" || v[p, "B", k] == "-") continue
                d = v[p, "B", k] - v[p, "A", k]
                if (count == 0 || d < lo) lo = d
                if (count == 0 || d > hi) hi = d
                sum += d; base += v[p, "A", k]; lower += (d < 0); count++
            }
            if (count == 0) { printf "%-11s %10s\n", k, "-"; continue }
            unit = (k == "ops" ? "ops/s" : "us/op")
            printf "%-11s %10.2f %10.2f %10.2f %9.1f%% %7d of %d\n", k " " unit, sum / count, lo, hi,
                100 * sum / base, lower, count
        }
    }' "$RESULTS"
