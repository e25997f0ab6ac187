#!/usr/bin/env bash
# System calls and context switches per operation, for HAProxy (TCP mode)
# and sessionguard on each of its I/O drivers (io_uring, epoll), under the
# same load and placement as bench/compare.sh (emulator on cpu1; load
# generator and middle sharing cpu0; sessionguard in observe mode, every
# rule on). Two runs per middle and connection count:
#   - untraced: the middle's CPU per operation, voluntary / involuntary
#     context switches per operation of the middle and the load generator
#     (an involuntary switch of the middle is the load generator, woken by
#     a reply, preempting it: the switch and the switch back are paid), and
#     the machine's TCP segments with data and pure ACKs received per
#     operation (all four hops of a round trip: 4 and 0 when every ACK
#     rides on data; a middle whose timing defeated the piggybacked ACK
#     would show pure ACKs above 0);
#   - under `strace -c -f` from before the first request to after the last:
#     each system call per operation, failed ones (EAGAIN) apart.
# It measures; it never judges. docs/performance.md quotes its output.
#
# Environment:
#   BENCH_CONNECTIONS="16 256"  BENCH_SECONDS=5
#   SESSIONGUARD_BIN, SESSIONGUARD_DEV_BIN  as for bench/compare.sh
set -euo pipefail

cd "$(dirname "$0")/.."
CONNECTIONS=${BENCH_CONNECTIONS:-"16 256"}
SECONDS_PER_POINT=${BENCH_SECONDS:-5}
# The load generator is sampled from 1 s into its run, ending 1 s early.
SAMPLE_SECONDS=$((SECONDS_PER_POINT - 2))

die() { echo "syscalls.sh: $*" >&2; exit 1; }
for tool in strace haproxy python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (Debian: apt-get install $tool)"
done
# shellcheck source=bench/common.sh
source "bench/common.sh"
bench_binaries
((SAMPLE_SECONDS >= 1)) || die "BENCH_SECONDS must be at least 3"

bench_workdir ""

bench_two_core_placement
start_emulator 1

declare -A PORT PID
P_HA=$(free_port)
haproxy_config "$WORK/haproxy.cfg" "$P_HA" "$P_EMU" 9000
on 0 haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PID[haproxy]=$!; PORT[haproxy]=$P_HA; PIDS+=($!)
wait_port "$P_HA" haproxy "${PID[haproxy]}"

for io in io_uring epoll; do
    start_observe_proxy "sg-$io" "$io" 0
    PID[sg-$io]=$SG_PID; PORT[sg-$io]=$SG_PORT
done

switches() { # pid -> "voluntary involuntary", all threads
    cat /proc/"$1"/task/*/status 2>/dev/null |
        awk '/^voluntary_ctxt/ {v += $2} /^nonvoluntary_ctxt/ {n += $2} END {print v + 0, n + 0}'
}
HZ=$(getconf CLK_TCK)

tcp_segments() { # -> "data-segments-sent pure-acks-received", the whole machine
    awk 'NR % 2 == 1 { split($0, key) }
         NR % 2 == 0 && $1 == "TcpExt:" { for (i = 2; i <= NF; i++) v[key[i]] = $i }
         END { print v["TCPOrigDataSent"] + 0, v["TCPPureAcks"] + 0 }' /proc/net/netstat
}

echo "# sessionguard bench/syscalls.sh — $(date -u +%FT%TZ)"
echo "# $(nproc) cpu ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')), Linux $(uname -r)"
echo "# $(haproxy -v 2>/dev/null | head -1)"
echo "# placement: client=cpu0 middle=cpu0 upstream=cpu1; ${SECONDS_PER_POINT}s per run"
for conns in $CONNECTIONS; do
    echo
    echo "## $conns connections"
    printf '%-12s %9s %11s %11s %11s %11s %9s %9s\n' middle ops/s "cpu us/op" "mid vol/op" "mid inv/op" \
        "load vol/op" "segs/op" "acks/op"
    for middle in haproxy sg-io_uring sg-epoll; do
        pid=${PID[$middle]}
        # Untraced: CPU and context switches, over the whole run.
        on 0 "$DEV_BIN" bench-load --target "127.0.0.1:${PORT[$middle]}" --connections "$conns" \
            --duration "${SECONDS_PER_POINT}s" --warmup 0s >"$WORK/line" &
        load=$!
        read -r mv0 mn0 < <(switches "$pid")
        read -r s0 a0 < <(tcp_segments)
        t0=$(cpu_ticks "$pid")
        wait "$load" || die "bench-load failed ($middle, $conns connections)"
        read -r s1 a1 < <(tcp_segments)
        # A finished process has no /proc entry: the load generator's
        # switches are sampled in the middle of a second run below.
        read -r mv1 mn1 < <(switches "$pid")
        t1=$(cpu_ticks "$pid")
        ops=$(sed -n 's/.*ops=\([0-9]*\) .*/\1/p' "$WORK/line")
        ((ops > 0)) || die "no operations ($middle, $conns connections): $(cat "$WORK/line")"
        rate=$(sed -n 's/.*ops_per_sec=\([0-9.]*\).*/\1/p' "$WORK/line")
        # Load generator's switches: sampled over the middle of a second run.
        on 0 "$DEV_BIN" bench-load --target "127.0.0.1:${PORT[$middle]}" --connections "$conns" \
            --duration "${SECONDS_PER_POINT}s" --warmup 0s >"$WORK/line2" &
        load=$!
        sleep 1
        read -r lv0 _ < <(switches "$load")
        q0=$(date +%s.%N)
        sleep "$SAMPLE_SECONDS"
        read -r lv1 _ < <(switches "$load")
        q1=$(date +%s.%N)
        wait "$load" || die "bench-load failed ($middle, $conns connections)"
        rate2=$(sed -n 's/.*ops_per_sec=\([0-9.]*\).*/\1/p' "$WORK/line2")
        python3 - "$middle" "$rate" "$ops" "$t0" "$t1" "$HZ" "$mv0" "$mv1" "$mn0" "$mn1" \
            "$lv0" "$lv1" "$q0" "$q1" "$rate2" "$s0" "$s1" "$a0" "$a1" <<'PY'
import sys
(middle, rate, ops, t0, t1, hz, mv0, mv1, mn0, mn1, lv0, lv1, q0, q1, rate2, s0, s1, a0, a1) = sys.argv[1:]
ops = int(ops)
cpu = (int(t1) - int(t0)) / int(hz) * 1e6 / ops
load_ops = float(rate2) * (float(q1) - float(q0))
print(f"{middle:12} {float(rate):9.0f} {cpu:11.2f} {(int(mv1) - int(mv0)) / ops:11.3f} "
      f"{(int(mn1) - int(mn0)) / ops:11.3f} {(int(lv1) - int(lv0)) / load_ops:11.3f} "
      f"{(int(s1) - int(s0)) / ops:9.2f} {(int(a1) - int(a0)) / ops:9.2f}")
PY
    done
    echo
    printf '%-12s %s\n' middle "system calls per operation (failed ones in brackets), under strace"
    for middle in haproxy sg-io_uring sg-epoll; do
        pid=${PID[$middle]}
        trace="$WORK/strace-$middle-$conns.txt"
        # Stopped with SIGTERM (a script's background job ignores SIGINT);
        # strace detaches and writes its summary on either.
        strace -c -f -p "$pid" -o "$trace" 2>/dev/null &
        tracer=$!
        sleep 0.5
        (on 0 "$DEV_BIN" bench-load --target "127.0.0.1:${PORT[$middle]}" --connections "$conns" \
            --duration "${SECONDS_PER_POINT}s" --warmup 0s >"$WORK/line") ||
            die "bench-load failed under strace ($middle, $conns connections)"
        kill -TERM "$tracer"
        wait "$tracer" 2>/dev/null || true
        ops=$(sed -n 's/.*ops=\([0-9]*\) .*/\1/p' "$WORK/line")
        python3 - "$middle" "$trace" "$ops" <<'PY'
import re, sys
middle, trace, ops = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = []
for line in open(trace):
    f = line.split()
    # % time, seconds, usecs/call, calls, [errors,] syscall
    if len(f) >= 5 and re.match(r"^[0-9.]+$", f[0]) and f[-1] != "total":
        count = int(f[3])
        errors = int(f[4]) if len(f) == 6 else 0
        calls.append((count, errors, f[-1]))
calls.sort(reverse=True)
total = sum(c for c, _, _ in calls)
parts = [f"{name} {c / ops:.2f}" + (f" ({e / ops:.2f})" if e else "") for c, e, name in calls if c / ops >= 0.005]
print(f"{middle:12} total {total / ops:.2f}: " + ", ".join(parts))
PY
    done
done
