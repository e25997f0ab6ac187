#!/usr/bin/env bash
# Throughput and latency of sessionguard against the two baselines, in ONE run
# on this machine (see docs/performance.md):
#   direct     load generator -> emulator (fast mode)
#   haproxy    load generator -> HAProxy (TCP mode) -> emulator
#   relay      load generator -> sessionguard-dev bench-relay -> emulator: a
#              frame-aware relay with no inspection at all, on the runtime and
#              driver the proxy's data threads use, the floor (what this machine
#              allows a relay that does nothing else; the header names its
#              driver, or why it was left out)
#   sg-observe load generator -> sessionguard (observe, every rule on) -> emulator
#   sg-off     load generator -> sessionguard (proxy.inspect = false) -> emulator
#   sg-flood   as sg-observe (its own proxy process), but every load connection
#              shares the same lsids (bench-load --shared-session): nearly every
#              request breaks a rule, the findings flood of issue 13 (at 2 or
#              more connections; at 1 there is nothing to overlap, so no point)
#   sg-epoll   as sg-observe with proxy.io = "epoll": the fallback data path
#              (containers whose seccomp profile blocks io_uring)
#   base-observe / base-off   with SESSIONGUARD_BASELINE_BIN: sg-observe and
#              sg-off run by that (older) binary in the same run, for a
#              before/after comparison on equal terms
# at 1, 16 and 256 connections, then the memory probes (10,000 idle
# connections through sessionguard; 1,000,000 sessions in a ledger).
#
# Prints a table, the ratios sessionguard/direct and sessionguard/haproxy, and
# as its last line: ratio_vs_direct=<x> ratio_vs_haproxy=<y> (throughput, 16
# connections). Exits non-zero only when it could not measure, never because
# a target was missed.
#
# Environment:
#   BENCH_SECONDS=5            measured seconds per point (after BENCH_WARMUP=1)
#   BENCH_ROUNDS=1             rounds of every point, interleaved (all configs and
#                              connection counts, then again): each figure is the
#                              median of the rounds (use an odd number), errors the
#                              sum. Slow drift of a shared machine then hits every
#                              middle alike instead of the one measured during it.
#   BENCH_CONNECTIONS="1 16 256"
#   BENCH_MEMORY=1             0 skips the memory probes
#   BENCH_IDLE_CONNECTIONS=10000   BENCH_SESSIONS=1000000
#   BENCH_PIN=1                0: no taskset pinning
#   BENCH_PLACEMENT=shared     on two CPUs: shared = the load generator and the middle
#                              share cpu0, the upstream has cpu1 (the application's
#                              core pays for the proxy); own = the middle has cpu1 to
#                              itself, the load generator and the upstream share cpu0
#                              (a proxy on its own core). Three or more CPUs: one each.
#   BENCH_LOAD_SCHED=other     batch: the load generator runs as SCHED_BATCH (chrt -b),
#                              so the processes it wakes are never preempted by it: a
#                              diagnostic of how a shared core's cost splits between a
#                              middle and the generator (docs/performance.md, seventh pass)
#   SESSIONGUARD_BIN=path      use this proxy binary instead of building (cargo build --release)
#   SESSIONGUARD_DEV_BIN=path  the dev tools' binary (emulator, bench-load, bench-relay; default:
#                              sessionguard-dev next to SESSIONGUARD_BIN, built with it)
#   SESSIONGUARD_BASELINE_BIN=path  also measure this sessionguard binary (base-*)
set -euo pipefail

cd "$(dirname "$0")/.."
SECONDS_PER_POINT=${BENCH_SECONDS:-5}
WARMUP=${BENCH_WARMUP:-1}
CONNECTIONS=${BENCH_CONNECTIONS:-"1 16 256"}
MEMORY=${BENCH_MEMORY:-1}
IDLE=${BENCH_IDLE_CONNECTIONS:-10000}
SESSIONS=${BENCH_SESSIONS:-1000000}
PIN=${BENCH_PIN:-1}
ROUNDS=${BENCH_ROUNDS:-1}
PLACE=${BENCH_PLACEMENT:-shared}

die() { echo "compare.sh: $*" >&2; exit 1; }
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive number"
[[ "$PLACE" == shared || "$PLACE" == own ]] || die "BENCH_PLACEMENT must be shared or own"
case ${BENCH_LOAD_SCHED:-other} in
    other) LOAD_SCHED=() ;;
    batch) LOAD_SCHED=(chrt --batch 0) ;;
    *) die "BENCH_LOAD_SCHED must be other or batch" ;;
esac
# shellcheck source=bench/common.sh
source "bench/common.sh"

# ---- binary -----------------------------------------------------------------
bench_binaries

# ---- HAProxy ----------------------------------------------------------------
if ! command -v haproxy >/dev/null; then
    echo "# haproxy not found; installing the Debian package" >&2
    if [[ $(id -u) -eq 0 ]]; then
        apt-cache policy haproxy | grep -q 'Candidate: [0-9]' || apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null ||
            die "apt-get install haproxy failed"
    else
        die "haproxy is missing and this is not root: apt-get install haproxy"
    fi
fi

# ---- file descriptors: the idle probe holds 2 per connection in the proxy ---
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
if [[ "$FD_LIMIT" != unlimited ]] && ((IDLE * 2 + 500 > FD_LIMIT)); then
    echo "# ulimit -n is $FD_LIMIT: idle probe reduced from $IDLE connections" >&2
    IDLE=$(((FD_LIMIT - 500) / 2))
fi

# ---- CPU placement ----------------------------------------------------------
CPUS=$(nproc)
if [[ "$PIN" == 1 ]] && command -v taskset >/dev/null && ((CPUS >= 2)); then
    if ((CPUS >= 3)); then
        CPU_CLIENT=0 CPU_MIDDLE=1 CPU_UPSTREAM=2
    elif [[ "$PLACE" == shared ]]; then
        # Two cores: the upstream gets one to itself (as a database server
        # would); the load generator and the proxy in the middle share the
        # other, so the proxy's CPU competes with the application's.
        CPU_CLIENT=0 CPU_MIDDLE=0 CPU_UPSTREAM=1
    else
        # The middle alone on a core, as a proxy deployed on its own host
        # or sidecar core would be; the load generator and the upstream
        # share the other, which then sets the throughput.
        CPU_CLIENT=0 CPU_MIDDLE=1 CPU_UPSTREAM=0
    fi
    # exec: a background `on ... &` then has the program's own pid in $!.
    on() { local cpu=$1; shift; exec taskset -c "$cpu" "$@"; }
    PLACEMENT="client=cpu$CPU_CLIENT middle=cpu$CPU_MIDDLE upstream=cpu$CPU_UPSTREAM"
else
    CPU_CLIENT=x CPU_MIDDLE=x CPU_UPSTREAM=x
    on() { shift; exec "$@"; }
    PLACEMENT="not pinned"
fi

# ---- ports and processes ----------------------------------------------------
bench_workdir ""

start_emulator "$CPU_UPSTREAM"

P_HA=$(free_port)
# HAProxy refuses to start when maxconn needs more descriptors than allowed.
HA_MAXCONN=20000
[[ "$FD_LIMIT" != unlimited ]] && HA_MAXCONN=$(((FD_LIMIT - 200) / 2))
haproxy_config "$WORK/haproxy.cfg" "$P_HA" "$P_EMU" "$HA_MAXCONN"
on "$CPU_MIDDLE" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PID_HA=$!; PIDS+=("$PID_HA")
wait_port "$P_HA" haproxy "$PID_HA"

declare -A ADMIN
start_sessionguard() { # name inspect [io] [binary] -> sets SG_PORT SG_PID
    local name=$1 inspect=$2 io=${3:-} bin=${4:-$BIN}
    SG_PORT=$(free_port)
    ADMIN[$name]=$(free_port)
    {
        echo "[proxy]"
        echo "listen = \"127.0.0.1:$SG_PORT\""
        echo "upstream = \"mongodb://127.0.0.1:$P_EMU\""
        echo "admin = \"127.0.0.1:${ADMIN[$name]}\""
        echo "max_connections = 40000"
        echo "inspect = $inspect"
        # Only set when asked: an older binary does not know the key.
        [[ -n "$io" ]] && echo "io = \"$io\""
        echo "[log]"
        echo "level = \"warn\""
        echo "[sessions]"
        echo "mode = \"observe\""
        # No [rules] section: every rule is enabled by default, so the
        # observe path runs all of them.
    } >"$WORK/$name.toml"
    on "$CPU_MIDDLE" "$bin" proxy --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
    SG_PID=$!; PIDS+=("$SG_PID")
    wait_port "$SG_PORT" "$name" "$SG_PID"
}
start_sessionguard sg-observe true
P_SG=$SG_PORT PID_SG=$SG_PID
start_sessionguard sg-off false
P_OFF=$SG_PORT PID_OFF=$SG_PID
start_sessionguard sg-flood true
P_FLOOD=$SG_PORT PID_FLOOD=$SG_PID

start_sessionguard sg-epoll true epoll
P_EPOLL=$SG_PORT PID_EPOLL=$SG_PID

# The floor (optional: an older dev binary lacks it).
P_RELAY=$(free_port)
on "$CPU_MIDDLE" "$DEV_BIN" bench-relay --listen "127.0.0.1:$P_RELAY" --upstream "127.0.0.1:$P_EMU" \
    >"$WORK/relay.log" 2>&1 &
PID_RELAY=$!; PIDS+=("$PID_RELAY")
RELAY_UP=0
for _ in $(seq 200); do
    # Its first line (the driver it runs on) is printed once it serves.
    grep -q listening "$WORK/relay.log" 2>/dev/null && port_open "$P_RELAY" && { RELAY_UP=1; break; }
    kill -0 "$PID_RELAY" 2>/dev/null || break
    sleep 0.05
done

declare -A PORT=([direct]=$P_EMU [haproxy]=$P_HA [sg-observe]=$P_SG [sg-off]=$P_OFF [sg-flood]=$P_FLOOD
    [sg-epoll]=$P_EPOLL)
# The process in the middle of each path, whose CPU time per operation is
# reported: a figure the other tenants of a shared machine disturb little.
declare -A MIDDLE=([direct]="" [haproxy]=$PID_HA [sg-observe]=$PID_SG [sg-off]=$PID_OFF [sg-flood]=$PID_FLOOD
    [sg-epoll]=$PID_EPOLL)
declare -A LOAD_FLAGS=([sg-flood]=--shared-session)
CONFIGS="direct haproxy sg-observe sg-off sg-flood sg-epoll"
if ((RELAY_UP)); then
    RELAY_NOTE="relay: $(head -1 "$WORK/relay.log") — frame-aware, no inspection"
    PORT[relay]=$P_RELAY MIDDLE[relay]=$PID_RELAY
    CONFIGS="direct haproxy relay sg-observe sg-off sg-flood sg-epoll"
else
    RELAY_NOTE="relay: not measured ($(head -1 "$WORK/relay.log" 2>/dev/null || echo "no log"))"
fi
if [[ -n "${SESSIONGUARD_BASELINE_BIN:-}" ]]; then
    [[ -x "$SESSIONGUARD_BASELINE_BIN" ]] || die "no baseline binary at $SESSIONGUARD_BASELINE_BIN"
    start_sessionguard base-observe true "" "$SESSIONGUARD_BASELINE_BIN"
    PORT[base-observe]=$SG_PORT MIDDLE[base-observe]=$SG_PID
    start_sessionguard base-off false "" "$SESSIONGUARD_BASELINE_BIN"
    PORT[base-off]=$SG_PORT MIDDLE[base-off]=$SG_PID
    CONFIGS="$CONFIGS base-observe base-off"
fi

load_average() { cut -d' ' -f1-3 /proc/loadavg; }
echo "# sessionguard bench/compare.sh — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "# machine: $CPUS cpu ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))," \
    "$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "# haproxy: $(haproxy -v 2>/dev/null | head -1)"
ROUNDS_NOTE=""
((ROUNDS == 1)) || ROUNDS_NOTE="; $ROUNDS interleaved rounds, each figure their median"
((${#LOAD_SCHED[@]} == 0)) || ROUNDS_NOTE+="; load generator SCHED_BATCH"
echo "# placement: $PLACEMENT; ${SECONDS_PER_POINT}s per point after ${WARMUP}s warm-up$ROUNDS_NOTE"
echo "# load average at start: $(load_average)"
echo "# sessionguard: $BIN (proxy.io = auto; sg-epoll: epoll)${SESSIONGUARD_BASELINE_BIN:+; baseline: $SESSIONGUARD_BASELINE_BIN}"
echo "# $RELAY_NOTE"

TICKS=$(getconf CLK_TCK)
declare -A OPS P50 P99 P999 ERR CPU LOAD SLEEPS
# Every round's value of a measure, "MEASURE,config,conns" -> " v1 v2 ...".
declare -A ROUND_VALUES
keep() { ROUND_VALUES[$1,$2,$3]+=" $4"; } # measure config conns value
# The rounds' values of a measure, one per line. None at all is no error: a
# field an older dev binary does not print leaves every round empty, and its
# row then shows "-".
values() { tr ' ' '\n' <<<"$1" | { grep . || true; }; }
# The median of the values ("-" if any is "-"; the lower middle one for an
# even count); errors are summed instead.
median() {
    [[ "$1" == *-* ]] && { echo -; return; }
    values "$1" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}
total() { values "$1" | awk '$1 != "-" { s += $1; n++ } END { print (n ? s : "-") }'; }
for ((round = 1; round <= ROUNDS; round++)); do
    for conns in $CONNECTIONS; do
        for config in $CONFIGS; do
            if [[ $config == sg-flood ]] && ((conns < 2)); then
                for measure in OPS P50 P99 P999 ERR CPU LOAD SLEEPS; do keep "$measure" "$config" "$conns" -; done
                continue
            fi
            ticks_before=$(cpu_ticks "${MIDDLE[$config]}")
            # shellcheck disable=SC2086 # LOAD_FLAGS holds zero or one flag
            line=$(on "$CPU_CLIENT" "${LOAD_SCHED[@]}" "$DEV_BIN" bench-load --target "127.0.0.1:${PORT[$config]}" ${LOAD_FLAGS[$config]:-} \
                --connections "$conns" --duration "${SECONDS_PER_POINT}s" --warmup "${WARMUP}s") ||
                die "bench-load failed for $config at $conns connections"
            ticks=$(($(cpu_ticks "${MIDDLE[$config]}") - ticks_before))
            ops_total=$(field "$line" "ops")
            # Warm-up operations are not counted in ops but did use CPU: scale.
            keep CPU "$config" "$conns" "$(awk -v t="$ticks" -v hz="$TICKS" -v ops="$ops_total" \
                -v w="$WARMUP" -v d="$SECONDS_PER_POINT" -v mid="${MIDDLE[$config]}" \
                'BEGIN { if (mid == "" || ops == 0) print "-"; else printf "%.1f", t / hz * 1e6 / (ops * (w + d) / d) }')"
            keep OPS "$config" "$conns" "$(field "$line" ops_per_sec)"
            keep P50 "$config" "$conns" "$(field "$line" p50_us)"
            keep P99 "$config" "$conns" "$(field "$line" p99_us)"
            keep P999 "$config" "$conns" "$(field "$line" p999_us)"
            keep ERR "$config" "$conns" "$(field "$line" errors)"
            keep LOAD "$config" "$conns" "$(field "$line" load_cpu_us_per_op)"
            keep SLEEPS "$config" "$conns" "$(field "$line" load_sleeps_per_op)"
        done
    done
done
for conns in $CONNECTIONS; do
    for config in $CONFIGS; do
        OPS[$config,$conns]=$(median "${ROUND_VALUES[OPS,$config,$conns]}")
        P50[$config,$conns]=$(median "${ROUND_VALUES[P50,$config,$conns]}")
        P99[$config,$conns]=$(median "${ROUND_VALUES[P99,$config,$conns]}")
        P999[$config,$conns]=$(median "${ROUND_VALUES[P999,$config,$conns]}")
        ERR[$config,$conns]=$(total "${ROUND_VALUES[ERR,$config,$conns]}")
        CPU[$config,$conns]=$(median "${ROUND_VALUES[CPU,$config,$conns]}")
        LOAD[$config,$conns]=$(median "${ROUND_VALUES[LOAD,$config,$conns]}")
        SLEEPS[$config,$conns]=$(median "${ROUND_VALUES[SLEEPS,$config,$conns]}")
    done
done
echo "# load average after the load runs: $(load_average)"
echo
printf '%-6s %-11s %10s %9s %9s %9s %7s %14s %14s\n' conns config ops/s p50_us p99_us p999_us errors \
    middle_cpu_us/op load_cpu_us/op
for conns in $CONNECTIONS; do
    for config in $CONFIGS; do
        printf '%-6s %-11s %10s %9s %9s %9s %7s %14s %14s\n' "$conns" "$config" "${OPS[$config,$conns]}" \
            "${P50[$config,$conns]}" "${P99[$config,$conns]}" "${P999[$config,$conns]}" "${ERR[$config,$conns]}" \
            "${CPU[$config,$conns]}" "${LOAD[$config,$conns]}"
    done
done
echo
# A ratio; "-" where a point was not measured (sg-flood at 1 connection).
div() { awk -v a="$1" -v b="$2" 'BEGIN { if (a !~ /^[0-9.]+$/) print "-"; else if (b > 0) printf "%.3f", a / b; else print "nan" }'; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
delta() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/) printf "%+.2f", a - b; else print "-" }'; }
printf '%-6s %-26s %-26s %-24s %-24s %-18s\n' conns "thru sg/direct (off)" "thru sg/haproxy (off)" \
    "p99 sg/direct (off)" "p99 sg/haproxy (off)" "added p99 us (sg)"
for conns in $CONNECTIONS; do
    printf '%-6s %-26s %-26s %-24s %-24s %-18s\n' "$conns" \
        "$(div "${OPS[sg-observe,$conns]}" "${OPS[direct,$conns]}") ($(div "${OPS[sg-off,$conns]}" "${OPS[direct,$conns]}"))" \
        "$(div "${OPS[sg-observe,$conns]}" "${OPS[haproxy,$conns]}") ($(div "${OPS[sg-off,$conns]}" "${OPS[haproxy,$conns]}"))" \
        "$(div "${P99[sg-observe,$conns]}" "${P99[direct,$conns]}") ($(div "${P99[sg-off,$conns]}" "${P99[direct,$conns]}"))" \
        "$(div "${P99[sg-observe,$conns]}" "${P99[haproxy,$conns]}") ($(div "${P99[sg-off,$conns]}" "${P99[haproxy,$conns]}"))" \
        "$(sub "${P99[sg-observe,$conns]}" "${P99[direct,$conns]}")"
done

# A per-operation measure of each middle against HAProxy's in the same run,
# one row per connection count: `against_haproxy ARRAY LABEL`.
against_haproxy() {
    local -n measure=$1
    echo
    printf '%-6s' conns
    for config in $CONFIGS; do [[ -n "${MIDDLE[$config]}" && $config != haproxy ]] && printf ' %-14s' "$config/ha"; done
    echo "   ($2)"
    for conns in $CONNECTIONS; do
        printf '%-6s' "$conns"
        for config in $CONFIGS; do
            [[ -n "${MIDDLE[$config]}" && $config != haproxy ]] || continue
            printf ' %-14s' "$(div "${measure[$config,$conns]}" "${measure[haproxy,$conns]}")"
        done
        echo
    done
}

# Throughput of every middle against HAProxy's (relay/ha: the floor's).
against_haproxy OPS "throughput"

# Middle CPU per operation against HAProxy's, and how each middle's CPU per
# operation grows from 16 to 256 connections.
against_haproxy CPU "middle cpu/op"
if [[ " $CONNECTIONS " == *" 16 "* && " $CONNECTIONS " == *" 256 "* ]]; then
    printf '%-6s' 256/16
    for config in $CONFIGS; do
        [[ -n "${MIDDLE[$config]}" && $config != haproxy ]] || continue
        printf ' %-14s' "$(div "${CPU[$config,256]}" "${CPU[$config,16]}")"
    done
    echo "   (middle cpu/op at 256 over 16; haproxy: $(div "${CPU[haproxy,256]}" "${CPU[haproxy,16]}"))"
fi

# What each middle makes the load generator pay per operation, against
# HAProxy: where the generator shares the middle's core, throughput is set
# by the sum of the two, so a middle that is cheap itself but makes the
# generator dearer still loses throughput.
against_haproxy LOAD "load generator cpu/op"

# How finely the generator and the middle on its core take turns: the
# generator's sleeps per operation (HAProxy answers each few requests at
# once; an io_uring middle submits once per loop turn, so the two alternate
# in batches of up to one operation per connection: about 150 at 256
# connections, 8 at 16). Which of them pays for the
# wake-ups moves with it; the shared core's sum below does not (ninth pass).
echo
printf '%-6s' conns
for config in $CONFIGS; do [[ -n "${MIDDLE[$config]}" ]] && printf ' %-14s' "$config"; done
echo "   (load generator sleeps/op)"
for conns in $CONNECTIONS; do
    printf '%-6s' "$conns"
    for config in $CONFIGS; do
        [[ -n "${MIDDLE[$config]}" ]] && printf ' %-14s' "${SLEEPS[$config,$conns]:--}"
    done
    echo
done

# The two together: what the core they share pays per operation. How it
# splits between them moves with which of them the scheduler lets preempt
# the other (BENCH_LOAD_SCHED=batch moves about 2 us per operation from the
# generator to sessionguard and leaves the sum); the sum is what sets the
# throughput, so it is the fair CPU comparison on a shared core.
if [[ "$CPU_CLIENT" == "$CPU_MIDDLE" && "$CPU_CLIENT" != x ]]; then
    declare -A CORE
    # shellcheck disable=SC2034 # read through against_haproxy's nameref
    for conns in $CONNECTIONS; do
        for config in $CONFIGS; do
            CORE[$config,$conns]=$(awk -v a="${CPU[$config,$conns]}" -v b="${LOAD[$config,$conns]}" \
                'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/) printf "%.2f", a + b; else print "-" }')
        done
    done
    against_haproxy CORE "middle + load generator cpu/op: the shared core"
    # Where sessionguard's shared-core time goes, from the floor up (us per
    # operation): the floor (a relay that does nothing else), what the data
    # path and its bookkeeping add (sg-off over relay), what the inspection
    # adds (sg-observe over sg-off); HAProxy's sum for scale.
    if [[ -n "${PORT[relay]:-}" ]]; then
        echo
        printf '%-6s %-14s %-22s %-22s %-13s %-12s\n' conns "floor (relay)" "+ data path (sg-off)" \
            "+ inspection (sg-obs)" "= sg-observe" "haproxy"
        for conns in $CONNECTIONS; do
            printf '%-6s %-14s %-22s %-22s %-13s %-12s\n' "$conns" "${CORE[relay,$conns]}" \
                "$(delta "${CORE[sg-off,$conns]}" "${CORE[relay,$conns]}")" \
                "$(delta "${CORE[sg-observe,$conns]}" "${CORE[sg-off,$conns]}")" \
                "${CORE[sg-observe,$conns]}" "${CORE[haproxy,$conns]}"
        done
        echo "   (the shared core's us per operation, middle + load generator)"
    fi
fi

# The flood: violations per inspected request and its CPU per operation
# against the clean run of the same build (sg-observe).
metric_sum() { # admin-port metric-name
    { exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3; } 2>/dev/null |
        awk -v m="$2" '$1 ~ "^"m"({|$)" { s += $2 } END { printf "%.0f", s }'
}
FLOOD_VIOLATIONS=$(metric_sum "${ADMIN[sg-flood]}" sessionguard_violations_total)
FLOOD_INSPECTED=$(metric_sum "${ADMIN[sg-flood]}" sessionguard_requests_inspected_total)
echo
echo "flood: $FLOOD_VIOLATIONS violations over $FLOOD_INSPECTED inspected requests" \
    "($(div "$FLOOD_VIOLATIONS" "$FLOOD_INSPECTED") per request)"
printf '%-6s %-30s\n' conns "middle cpu/op sg-flood/sg-observe"
for conns in $CONNECTIONS; do
    ((conns < 2)) && continue
    printf '%-6s %-30s\n' "$conns" "$(div "${CPU[sg-flood,$conns]}" "${CPU[sg-observe,$conns]}")"
done

if [[ "$MEMORY" == 1 ]]; then
    echo
    line=$(on "$CPU_CLIENT" "$DEV_BIN" bench-load --target "127.0.0.1:$P_SG" \
        --idle-connections "$IDLE" --pid "$PID_SG") || die "idle-connections probe failed"
    echo "idle connections through sg-observe: $line"
    if [[ -n "${PORT[base-observe]:-}" ]]; then
        line=$(on "$CPU_CLIENT" "$DEV_BIN" bench-load --target "127.0.0.1:${PORT[base-observe]}" \
            --idle-connections "$IDLE" --pid "${MIDDLE[base-observe]}") || die "idle-connections probe failed"
        echo "idle connections through base-observe: $line"
    fi
    line=$(on "$CPU_CLIENT" "$DEV_BIN" bench-load --sessions "$SESSIONS") || die "sessions probe failed"
    echo "ledger: $line"
fi

REF=16
[[ " $CONNECTIONS " == *" $REF "* ]] || REF=$(awk '{print $NF}' <<<"$CONNECTIONS")
echo "ratio_vs_direct=$(div "${OPS[sg-observe,$REF]}" "${OPS[direct,$REF]}") ratio_vs_haproxy=$(div "${OPS[sg-observe,$REF]}" "${OPS[haproxy,$REF]}")"
