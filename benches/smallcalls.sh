#!/usr/bin/env bash
# Small calls against their floor, on one loopback SeaweedFS: a 1 KiB
# `word_count` Run through the gateway (p50, p99), the floor measured in the
# same rounds (one GET of the input with the gateway's store client, plus
# one Invoke on the runtime directly), and runs per second at 32 clients
# (examples/smallcalls.rs). Prints the medians over the rounds and the
# gateway's overhead over the floor. With BASE=<rev>, that revision's
# gateway and runtime run too, alternating round by round, and each
# measure gets its ratio.
#   bash benches/smallcalls.sh      # ROUNDS=3 RUNS=300 CONCURRENCY=32 [BASE=<rev>]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}" RUNS="${RUNS:-300}" CONCURRENCY="${CONCURRENCY:-32}" BASE="${BASE:-}"
cache="$HOME/.cache/prefab-gateway"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
source benches/seaweedfs.sh
bench_tools
if [ -n "$BASE" ]; then
  source benches/revisions.sh
  build_revisions smallcalls
  revisions=(head base)
else
  cargo build --release --locked --example smallcalls --bin prefab
  mkdir -p "$cache/bench-bin"
  cp "$CARGO_TARGET_DIR/release/prefab" "$cache/bench-bin/prefab-head"
  cp "$CARGO_TARGET_DIR/release/examples/smallcalls" "$cache/bench-bin/smallcalls"
  revisions=(head)
fi

start_seaweedfs "$venv/bin/weed"
head -c 768 /dev/urandom | base64 -w 0 | fold -w 64 >"$work/small.txt"
"$venv/bin/s5cmd" --endpoint-url "$s3" cp "$work/small.txt" s3://bench/small.txt >/dev/null

# One round of one revision: its runtime and gateway on a fresh volume,
# the client, then both stopped.
round() { # NAME
  local ws="$work/ws-$1" rt=29981 gw=29982
  start_prefab "$cache/bench-bin/prefab-$1" "$1" "$rt" "$gw"
  "$cache/bench-bin/smallcalls" "127.0.0.1:$gw" "127.0.0.1:$rt" "$ws" "$s3" s3://bench/small.txt \
    "$RUNS" "$CONCURRENCY" | sed "s/^/$1 /" | tee -a "$work/samples" >&2
  kill "$gw_pid" "$rt_pid"; wait "$gw_pid" "$rt_pid" 2>/dev/null || true
}
for run in $(seq 1 "$ROUNDS"); do
  echo "round $run of $ROUNDS" >&2
  order=("${revisions[@]}")
  [ $((run % 2)) = 0 ] && order=($(printf '%s\n' "${revisions[@]}" | tac))
  for rev in "${order[@]}"; do round "$rev"; done
done

python3 - "$work/samples" "$BASE" <<'EOF2'
import statistics, sys
samples, base = sys.argv[1], sys.argv[2]
values = {}
for line in open(samples):
    rev, measure, value = line.split()
    values.setdefault((rev, measure), []).append(float(value))
for rev in ["head", "base"]:
    run, floor = values.get((rev, "run-p50-ms")), values.get((rev, "floor-p50-ms"))
    if run:  # the overhead of each round, against that round's floor
        values[(rev, "overhead-p50-ms")] = [r - f for r, f in zip(run, floor)]
med = {k: statistics.median(v) for k, v in values.items()}
measures = ["floor-get-p50-ms", "floor-invoke-p50-ms", "floor-p50-ms", "run-p50-ms", "run-p99-ms",
            "overhead-p50-ms", "runs-per-second"]
if not base:
    for m in measures:
        print(f"{m} {med[('head', m)]:.2f}")
else:
    print(f"| measure | {base} | this checkout | ratio |")
    print("| --- | --- | --- | --- |")
    for m in measures:
        b, h = med[("base", m)], med[("head", m)]
        print(f"| {m} | {b:.2f} | {h:.2f} | {h / b:.2f}x |")
EOF2
