#!/usr/bin/env bash
# Run-level benchmark of this checkout against an earlier revision, side by
# side on one loopback SeaweedFS: sequential small word_count runs (p50,
# p99) and `Run sha256` of a big object, through each revision's own gateway
# and example prefab, the revisions alternating round by round. Prints the
# medians and this checkout's ratio to the other's.
#   BASE=<rev> bash benches/runs.sh     # RUNS=5 SMALL=200 BIG_MIB=1024
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${BASE:?name the revision to compare with, e.g. BASE=HEAD~3}"
RUNS="${RUNS:-5}" SMALL="${SMALL:-200}" BIG_MIB="${BIG_MIB:-1024}"
cache="$HOME/.cache/prefab-gateway"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
source benches/seaweedfs.sh
bench_tools

source benches/revisions.sh
build_revisions runbench
client="$cache/bench-bin/runbench"

start_seaweedfs "$venv/bin/weed"
head -c 1024 /dev/urandom | base64 >"$work/small.txt"
head -c "$((BIG_MIB << 20))" /dev/urandom >"$work/big.bin"
s5="$venv/bin/s5cmd --endpoint-url $s3"
$s5 cp "$work/small.txt" s3://bench/small.txt >/dev/null
$s5 cp "$work/big.bin" s3://bench/big.bin >/dev/null
rm "$work/big.bin"

# One round of one revision: its runtime and gateway on ports below the
# ephemeral range, the client, then both stopped.
round() { # NAME
  local gw=29972
  start_prefab "$cache/bench-bin/prefab-$1" "$1" 29971 "$gw"
  sync; sleep 1
  "$client" "127.0.0.1:$gw" s3://bench/small.txt "$SMALL" s3://bench/big.bin 1 |
    sed "s/^/$1 /" | tee -a "$work/samples" >&2
  kill "$gw_pid" "$rt_pid"; wait "$gw_pid" "$rt_pid" 2>/dev/null || true
}
for run in $(seq 1 "$RUNS"); do
  echo "round $run of $RUNS" >&2
  if [ $((run % 2)) = 1 ]; then round base; round head; else round head; round base; fi
done

python3 - "$work/samples" "$BIG_MIB" "$BASE" <<'EOF'
import statistics, sys
samples, mib, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
values = {}
for line in open(samples):
    rev, measure, value = line.split()
    values.setdefault((measure, rev), []).append(float(value))
med = {k: statistics.median(v) for k, v in values.items()}
mb = mib * 1048576 / 1e6
print(f"| measure | {base} | this checkout | ratio |")
print("| --- | --- | --- | --- |")
for measure, unit in [("small-p50-ms", "ms"), ("small-p99-ms", "ms")]:
    b, h = med[(measure, "base")], med[(measure, "head")]
    print(f"| {measure} | {b:.2f} {unit} | {h:.2f} {unit} | {h / b:.3f}x |")
b, h = mb / med[("big-seconds", "base")], mb / med[("big-seconds", "head")]
print(f"| Run sha256 {mib} MiB | {b:.0f} MB/s | {h:.0f} MB/s | {h / b:.3f}x |")
EOF
