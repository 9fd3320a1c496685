# Sourced by the benchmarks. `start_seaweedfs WEED` makes a scratch folder
# ($work; removed at exit, with every process in $pids stopped) and starts
# SeaweedFS there (`weed mini`, loopback only, telemetry off) on $s3 with
# the bucket `bench` and the credentials it exports.
start_seaweedfs() { # WEED
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_DEFAULT_REGION=us-east-1
  s3=http://127.0.0.1:8333
  mkdir -p "$work/weed"
  "$1" mini -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 -bucket=bench >"$work/weed.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 120); do curl -s -o /dev/null "$s3" && break; sleep 0.5; done
  sleep 3
}
