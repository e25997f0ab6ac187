# Port helpers shared by bench/compare.sh and bench/profile.sh (sourced).
# Needs `die` and `$WORK` (where each process's `$name.log` goes).

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
