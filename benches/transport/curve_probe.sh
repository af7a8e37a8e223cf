#!/usr/bin/env bash
# Can the `zmq` crate do CURVE? zmq-sys 0.12 builds libzmq without it, so:
#  1. copy zmq-sys 0.12.0 from the local cargo registry into target/zmq-sys-curve,
#  2. swap its build script for one that passes libsodium (compiled from the
#     source tarball bundled in the libsodium-sys-stable crate) to zeromq-src,
#  3. build curve-probe/ against it ([patch.crates-io]), timing a clean build,
#  4. CURVE echo + latency: Rust<->Rust, Rust DEALER->pyzmq ROUTER,
#     pyzmq DEALER->Rust ROUTER (loopback only).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
T="${CARGO_TARGET_DIR:-$HERE/target}"
mkdir -p "$T"

src="$(cargo metadata --format-version 1 --features libzmq 2>/dev/null | python3 -c '
import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "zmq-sys" and p["version"] == "0.12.0"))')"
rm -rf "$T/zmq-sys-curve"
cp -r "$src" "$T/zmq-sys-curve"
cat >>"$T/zmq-sys-curve/Cargo.toml" <<'TOML'

[dependencies.libsodium-sys-stable]
version = "1.24"
TOML
cat >"$T/zmq-sys-curve/build/main.rs" <<'RS'
// Patched by ferroparallel benches/transport/curve_probe.sh: build the vendored
// libzmq with CURVE, linking libsodium built by libsodium-sys-stable
// (its `links = "sodium"` metadata arrives as DEP_SODIUM_INCLUDE / DEP_SODIUM_LIB).
fn main() {
    println!("cargo:rerun-if-changed=build/main.rs");
    let inc = std::env::var("DEP_SODIUM_INCLUDE").expect("DEP_SODIUM_INCLUDE");
    let lib = std::env::var("DEP_SODIUM_LIB").expect("DEP_SODIUM_LIB");
    zeromq_src::Build::new()
        .with_libsodium(Some(zeromq_src::LibLocation::new(lib, inc))) // (lib_dir, include_dir)
        .build();
}
RS

dir="$T/curve-probe-clean"
rm -rf "$dir"
start="$(date +%s.%N)"
(cd curve-probe && CARGO_TARGET_DIR="$dir" cargo build --release --quiet)
end="$(date +%s.%N)"
printf 'BUILD curve-probe (zmq + patched zmq-sys + libsodium) clean secs=%.1f\n' "$(echo "$end - $start" | bc)"
P="$dir/release/fp-curve-probe"
"$P" facts

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
read -r PUB SEC < <(python3 -c 'import zmq; p,s=zmq.curve_keypair(); print(p.decode(), s.decode())')

EP="tcp://127.0.0.1:$(port)"
"$P" echo "$EP" "$SEC" & spid=$!
sleep 0.5
timeout 120 "$P" check "$EP" "$PUB" 20000 || echo "FAILED rust<->rust"
timeout 60 python3 interop.py curve-check "$EP" "$PUB" || echo "FAILED pyzmq DEALER -> rust ROUTER"
timeout 10 "$P" quit "$EP" "$PUB" || true
wait "$spid" || true

EP="tcp://127.0.0.1:$(port)"
python3 interop.py curve-echo "$EP" "$SEC" & spid=$!
sleep 0.5
timeout 120 "$P" check "$EP" "$PUB" 2000 | sed 's/client=libzmq+curve/client=libzmq+curve server=pyzmq/; s/impl=libzmq+curve/impl=libzmq+curve-vs-pyzmq/' || echo "FAILED rust DEALER -> pyzmq ROUTER"
timeout 10 "$P" quit "$EP" "$PUB" || true
wait "$spid" || true
