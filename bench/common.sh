# Helpers shared by bench/compare.sh, bench/profile.sh and bench/syscalls.sh
# (sourced from the repository root, after the script's own `die`).

# The proxy (sessionguard) and the dev tools (sessionguard-dev: the emulator
# and the load generator), both release builds: SESSIONGUARD_BIN and
# SESSIONGUARD_DEV_BIN name prebuilt ones. Sets BIN and DEV_BIN.
bench_binaries() {
    if [[ -n "${SESSIONGUARD_BIN:-}" ]]; then
        BIN=$SESSIONGUARD_BIN
    else
        cargo build --release --quiet -p sessionguard -p sessionguard-dev ||
            die "cargo build --release failed"
        BIN=${CARGO_TARGET_DIR:-target}/release/sessionguard
    fi
    DEV_BIN=${SESSIONGUARD_DEV_BIN:-$(dirname "$BIN")/sessionguard-dev}
    [[ -x "$BIN" ]] || die "no sessionguard binary at $BIN"
    [[ -x "$DEV_BIN" ]] || die "no sessionguard-dev binary at $DEV_BIN (cargo build --release -p sessionguard-dev)"
}

# The run's folder (each process's `$name.log` goes there) and PIDS, the
# processes killed on exit. With a folder argument it is kept afterwards.
bench_workdir() { # [keep-dir]
    KEEP_WORK=${1:-}
    WORK=${1:-$(mktemp -d)}
    mkdir -p "$WORK"
    PIDS=()
    trap bench_cleanup EXIT
}

bench_cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [[ -n "$KEEP_WORK" ]] || rm -rf "$WORK"
}

# `on CPU PROGRAM...` for the in-place tools (profile.sh, syscalls.sh), which
# use compare.sh's two-core placement: the emulator on cpu1, the load
# generator and the middle sharing cpu0. exec: a background `on ... &` then
# has the program's own pid in $!.
bench_two_core_placement() {
    if (($(nproc) >= 2)) && command -v taskset >/dev/null; then
        on() { local cpu=$1; shift; exec taskset -c "$cpu" "$@"; }
    else
        on() { shift; exec "$@"; }
    fi
}

# The benchmarks' upstream (`emulator --fast`) on a CPU; sets P_EMU.
start_emulator() { # cpu
    P_EMU=$(free_port)
    on "$1" "$DEV_BIN" emulator --fast --listen "127.0.0.1:$P_EMU" --log-level warn >"$WORK/emulator.log" 2>&1 &
    PIDS+=($!)
    wait_port "$P_EMU" emulator "$!"
}

# sessionguard in front of the emulator, observe mode, every rule on, on a
# CPU with the given `proxy.io` (and, optionally, another binary than BIN
# and `proxy.inspect`); sets SG_PORT and SG_PID.
start_observe_proxy() { # name io cpu [binary] [inspect]
    local name=$1 io=$2 cpu=$3 bin=${4:-$BIN} inspect=${5:-true} admin
    SG_PORT=$(free_port) admin=$(free_port)
    cat >"$WORK/$name.toml" <<TOML
[proxy]
listen = "127.0.0.1:$SG_PORT"
upstream = "mongodb://127.0.0.1:$P_EMU"
admin = "127.0.0.1:$admin"
max_connections = 40000
io = "$io"
inspect = $inspect
[log]
level = "warn"
[sessions]
mode = "observe"
TOML
    on "$cpu" "$bin" proxy --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
    SG_PID=$!
    PIDS+=("$SG_PID")
    wait_port "$SG_PORT" "$name" "$SG_PID"
}

# HAProxy in TCP mode from 127.0.0.1:port to the emulator.
haproxy_config() { # file port emulator-port maxconn
    cat >"$1" <<CFG
global
    maxconn $4
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend bench
    bind 127.0.0.1:$2
    default_backend emulator
backend emulator
    server emulator 127.0.0.1:$3
CFG
}

# One `key=value` field of a bench-load result line.
field() { grep -o "$2=[0-9.]*" <<<"$1" | cut -d= -f2; } # line key

# utime + stime of a process, in clock ticks (the comm field may hold
# spaces); 0 for no process (the direct path has no middle).
cpu_ticks() { [[ -n "$1" ]] && awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" || echo 0; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    # Below the kernel's ephemeral range (32768+ by default): a listen port
    # there can be taken by an outgoing connection's source port (bind then
    # fails), and the idle probe leaves thousands of TIME_WAIT ports behind.
    local port
    while :; do
        port=$((20000 + RANDOM % 12000))
        port_open "$port" || { echo "$port"; return; }
    done
}

wait_port() { # port name pid
    local port=$1 name=$2 pid=$3
    for _ in $(seq 200); do
        port_open "$port" && return 0
        kill -0 "$pid" 2>/dev/null || die "$name exited at startup (log: $(tail -3 "$WORK/$name.log" 2>/dev/null))"
        sleep 0.05
    done
    die "$name did not listen on $port"
}
