#!/usr/bin/env bash
# Start or stop a Mosquitto of our own on a free loopback port.
#   .ci/mosquitto.sh start DIR [PASSWORD_FILE]   prints the port; the pid is in DIR/pid
#   .ci/mosquitto.sh stop DIR
set -euo pipefail
cmd=$1 dir=$2
here=$(cd "$(dirname "$0")" && pwd)
case "$cmd" in
start)
  mkdir -p "$dir"
  port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
  sed -e "s#PORT#$port#" -e "s#DIR#$dir#g" "$here/mosquitto.conf" > "$dir/mosquitto.conf"
  if [ -n "${3:-}" ]; then
    sed -i 's/^allow_anonymous true/allow_anonymous false/' "$dir/mosquitto.conf"
    echo "password_file $3" >> "$dir/mosquitto.conf"
  fi
  mosquitto -c "$dir/mosquitto.conf" >"$dir/stdout.log" 2>&1 &
  echo $! > "$dir/pid"
  for _ in $(seq 50); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; exit 0; fi
    kill -0 "$(cat "$dir/pid")" 2>/dev/null || { cat "$dir/stdout.log" "$dir/mosquitto.log" >&2 || true; exit 1; }
    sleep 0.1
  done
  echo "mosquitto did not listen on $port" >&2; exit 1 ;;
stop)
  if [ -f "$dir/pid" ]; then
    pid=$(cat "$dir/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$dir/pid"
  fi ;;
*) echo "usage: $0 start|stop DIR [PASSWORD_FILE]" >&2; exit 2 ;;
esac
