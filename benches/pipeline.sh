#!/usr/bin/env bash
# A two-step pipeline on a big object against the same two steps as two
# runs, side by side on one loopback SeaweedFS (examples/pipeline.rs):
# `uppercase` then `sha256` of its output as one run (the output handed
# over on the workspace) and as two runs (the second downloads what the
# first uploaded). Prints the medians, the pipeline's ratio, and that of
# its second step alone against the same call as a run of its own.
#   bash benches/pipeline.sh      # ROUNDS=5 BIG_MIB=1024
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-5}" BIG_MIB="${BIG_MIB:-1024}"
cache="$HOME/.cache/prefab-gateway"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
source benches/seaweedfs.sh
bench_tools
cargo build --release --locked --example pipeline --bin prefab
bin="$CARGO_TARGET_DIR/release"

start_seaweedfs "$venv/bin/weed"
# Text (base64 lines), so that uppercase has letters to change: BIG_MIB MiB
# and a little more.
head -c "$(((BIG_MIB << 20) * 3 / 4))" /dev/urandom | base64 -w 76 >"$work/big.txt"
"$venv/bin/s5cmd" --endpoint-url "$s3" cp "$work/big.txt" s3://bench/big.txt >/dev/null
rm "$work/big.txt"

# Its own workspace budget: admission must not depend on how full this
# machine's disk happens to be.
gw=29992
start_prefab "$bin/prefab" pipeline 29991 "$gw" --s3-bucket bench --workspace-capacity-bytes $((8 << 30))
"$bin/examples/pipeline" "127.0.0.1:$gw" s3://bench/big.txt "$ROUNDS" | tee "$work/samples" >&2

python3 - "$work/samples" "$BIG_MIB" <<'EOF2'
import statistics, sys
values = {}
for line in open(sys.argv[1]):
    measure, value = line.split()
    values.setdefault(measure, []).append(float(value))
med = {k: statistics.median(v) for k, v in values.items()}
for m in ["pipeline-seconds", "separate-seconds", "pipeline-sha256-seconds", "sha256-seconds", "uppercase-seconds"]:
    print(f"{m} {med[m]:.2f}")
print(f"pipeline/separate {med['pipeline-seconds'] / med['separate-seconds']:.2f}x")
print(f"second step, pipeline/own run {med['pipeline-sha256-seconds'] / med['sha256-seconds']:.2f}x")
EOF2
