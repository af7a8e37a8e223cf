#!/usr/bin/env bash
# Clean release build time of each transport option: every build uses a fresh,
# empty CARGO_TARGET_DIR (the crates.io download cache is kept, so this is
# compile time, not download time). Builds run one after another.
#
#   benches/transport/build_times.sh            # 2 rounds
#   ROUNDS=3 benches/transport/build_times.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
BASE="${CARGO_TARGET_DIR:-$HERE/target}"
ROUNDS="${ROUNDS:-2}"
mkdir -p "$BASE"
cargo fetch --quiet

echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(cargo --version)"
echo "# system libzmq present: $(ldconfig -p | grep -c 'libzmq' || true) entries in ldconfig; pkg-config libzmq: $(pkg-config --modversion libzmq 2>/dev/null || echo none)"
for feat in libzmq zmtp; do
    n="$(cargo tree --quiet --features "$feat" -e normal,build --prefix none | sed 's/ (\*)//' | sort -u | wc -l)"
    echo "# feature $feat: $n crates in the dependency tree (incl. this one)"
done

for round in $(seq 1 "$ROUNDS"); do
    for pair in "libzmq bench-libzmq" "zmtp bench-zeromq"; do
        set -- $pair
        dir="$(mktemp -d "$BASE/clean-$1-XXXX")"
        # wall time, and CPU time (user+sys of cargo and all compilers), which
        # is much less sensitive to other load on a shared machine
        read -r wall cpu < <(CARGO_TARGET_DIR="$dir" python3 - "$1" "$2" <<'EOF'
import os, resource, subprocess, sys, time
t = time.monotonic()
subprocess.run(["cargo", "build", "--release", "--quiet", "--features", sys.argv[1], "--bin", sys.argv[2]], check=True)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{time.monotonic() - t:.1f} {ru.ru_utime + ru.ru_stime:.1f}")
EOF
)
        size="$(stat -c %s "$dir/release/$2")"
        printf 'BUILD feature=%s round=%d secs=%s cpu_secs=%s binary_bytes=%d\n' "$1" "$round" "$wall" "$cpu" "$size"
        rm -rf "$dir"
    done
done
