#!/usr/bin/env bash
# Build and run the ZMQ transport comparison (libzmq via `zmq` crate, pure-Rust
# `zeromq` crate, pyzmq baseline) on DEALER<->ROUTER over 127.0.0.1, then
# print the summary table and the interop matrix.
#
#   benches/transport/run.sh                 # full run (REPS=5), ~5 min on 2 cores
#   REPS=3 N_LAT=20000 N_THR=200000 BW_MIB=128 BW_REPS=5 IDLE=16 benches/transport/run.sh
#   benches/transport/run.sh --build-times   # also time clean builds (fresh target dirs)
#
# Every server/client pair runs alone: configurations are run one after
# another, never concurrently. Raw RESULT lines go to $OUT.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HERE/target}"
REPS="${REPS:-5}"
N_LAT="${N_LAT:-20000}"
N_THR="${N_THR:-200000}"
WINDOW="${WINDOW:-500}"
BW_MIB="${BW_MIB:-128}"
BW_REPS="${BW_REPS:-5}"
IDLE="${IDLE:-16}"          # extra idle DEALERs for the "many peers" rows (0 = skip)
OUT="${OUT:-$CARGO_TARGET_DIR/transport-results.txt}"
CLIENT_TIMEOUT="${CLIENT_TIMEOUT:-300}"

if [[ "${1:-}" == "--build-times" ]]; then
    "$HERE/build_times.sh"
fi

python3 -c 'import zmq' 2>/dev/null || python3 -m pip install --quiet pyzmq

echo "== building (release) into $CARGO_TARGET_DIR" >&2
cargo build --release --quiet --features libzmq,zmtp --bins
BIN="$CARGO_TARGET_DIR/release"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    python3 - "$1" <<'EOF'
import socket, sys, time
port = int(sys.argv[1])
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit("server did not start on port %d" % port)
EOF
}

# name -> command prefix (server and client are the same program)
declare -A CMD=(
    [libzmq]="$BIN/bench-libzmq"
    [zeromq-ct]="env FP_TOKIO=current $BIN/bench-zeromq"
    [zeromq-mt]="env FP_TOKIO=multi $BIN/bench-zeromq"
    [pyzmq]="python3 $HERE/interop.py"
)
CONFIGS=(libzmq zeromq-ct zeromq-mt pyzmq)

# The machine is shared: before each measurement wait (up to QUIET_MAX s)
# until the CPUs are mostly idle; the busy fraction seen last is recorded in
# the RESULT line (busy=PERCENT) and summarize.py drops measurements that
# started on a busy machine (MAX_BUSY, default 25%).
QUIET_MAX="${QUIET_MAX:-600}"
wait_quiet() {
    python3 - "$QUIET_MAX" <<'EOF'
import sys, time
def snap():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(f), f[3] + f[4]
deadline = time.time() + float(sys.argv[1])
while True:
    t0, i0 = snap(); time.sleep(1.0); t1, i1 = snap()
    busy = 1 - (i1 - i0) / max(1, t1 - t0)
    if busy < 0.10 or time.time() > deadline:
        print(round(busy * 100))
        break
EOF
}

SERVER_PID=""
start_server() { # $1 = config, sets EP
    local port
    port="$(free_port)"
    EP="tcp://127.0.0.1:$port"
    ${CMD[$1]} echo "$EP" 2>/dev/null &
    SERVER_PID=$!
    wait_port "$port"
}
stop_server() { # $1 = config
    timeout 10 ${CMD[$1]} quit "$EP" >/dev/null 2>&1 || true
    if kill -0 "$SERVER_PID" 2>/dev/null; then kill "$SERVER_PID" 2>/dev/null || true; fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap '[[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null || true' EXIT

run_client() { # $1 = config, $2.. = args; tags RESULT lines with config, idle peers, busy%
    local busy
    busy="$(wait_quiet)"
    { timeout "$CLIENT_TIMEOUT" ${CMD[$1]} "${@:2}" || echo "# client failed (rc=$?): $1 ${*:2}" >&2; } | sed -e "s/^RESULT impl=[^ ]*/RESULT cfg=$1 idle=${FP_IDLE_PEERS:-0} busy=$busy/"
}

: >"$OUT"
{
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# host: $(uname -srm), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
    echo "# rustc: $(rustc --version); python: $(python3 --version 2>&1); pyzmq: $(python3 -c 'import zmq; print(zmq.__version__, "libzmq", zmq.zmq_version())')"
    echo "# params: REPS=$REPS N_LAT=$N_LAT N_THR=$N_THR WINDOW=$WINDOW BW_MIB=$BW_MIB BW_REPS=$BW_REPS IDLE=$IDLE"
} | tee -a "$OUT" >&2

for rep in $(seq 1 "$REPS"); do
    for cfg in "${CONFIGS[@]}"; do
        echo "== rep $rep/$REPS: $cfg" >&2
        start_server "$cfg"
        run_client "$cfg" lat "$EP" "$N_LAT" | tee -a "$OUT"
        run_client "$cfg" thr "$EP" "$N_THR" "$WINDOW" | tee -a "$OUT"
        run_client "$cfg" bw "$EP" "$BW_MIB" "$BW_REPS" | tee -a "$OUT"
        if [[ "$cfg" == libzmq ]]; then
            # same measurement, but the frame goes through zmq_msg_init_data
            # with our own free callback (the path for Python buffers)
            run_client "$cfg" bw-ffi "$EP" "$BW_MIB" "$BW_REPS" | sed 's/cfg=libzmq/cfg=libzmq-ffi/' | tee -a "$OUT"
        fi
        stop_server "$cfg"
        if [[ "$IDLE" -gt 0 ]]; then
            start_server "$cfg"
            FP_IDLE_PEERS="$IDLE" run_client "$cfg" lat "$EP" "$N_LAT" | tee -a "$OUT"
            FP_IDLE_PEERS="$IDLE" run_client "$cfg" thr "$EP" "$N_THR" "$WINDOW" | tee -a "$OUT"
            stop_server "$cfg"
        fi
    done
done

echo "== interop matrix (client x server)" >&2
INTEROP="$OUT.interop"
: >"$INTEROP"
for srv in libzmq zeromq-ct pyzmq; do
    for cli in libzmq zeromq-ct pyzmq; do
        start_server "$srv"
        if out="$(timeout "$CLIENT_TIMEOUT" ${CMD[$cli]} check "$EP" 2>&1)"; then rc=0; else rc=$?; fi
        stop_server "$srv"
        summary="$(grep -E '^[0-9]+ passed, [0-9]+ failed' <<<"$out" || echo "no summary (rc=$rc)")"
        echo "INTEROP server=$srv client=$cli rc=$rc $summary" | tee -a "$INTEROP"
        grep '^CHECK' <<<"$out" | sed "s/^/  [server=$srv] /" >>"$INTEROP"
    done
done

python3 "$HERE/summarize.py" "$OUT" "$INTEROP"
