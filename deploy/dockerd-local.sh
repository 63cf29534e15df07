#!/usr/bin/env bash
# A private Docker engine for machines where none runs (this project's CI):
# Debian's dockerd with its own data root and socket, so it touches no
# system daemon.
#
#   deploy/dockerd-local.sh start [DIR]   # prints: export DOCKER_HOST=unix://DIR/docker.sock
#   deploy/dockerd-local.sh stop [DIR]
#
# DIR defaults to /var/tmp/dyadlab-docker; images built there survive for the
# next run (warm builds). Needs root and dockerd (apt-get install docker.io).
set -euo pipefail
cmd=${1:?usage: dockerd-local.sh start|stop [DIR]}
dir=${2:-${DYADLAB_DOCKER_DIR:-/var/tmp/dyadlab-docker}}
sock=unix://$dir/docker.sock
case "$cmd" in
  start)
    command -v dockerd >/dev/null || { echo "dockerd missing: apt-get install docker.io" >&2; exit 1; }
    mkdir -p "$dir"
    if [ -f "$dir/docker.pid" ] && kill -0 "$(cat "$dir/docker.pid")" 2>/dev/null; then
      echo "export DOCKER_HOST=$sock"; exit 0
    fi
    setsid dockerd --data-root "$dir/root" --exec-root "$dir/exec" -H "$sock" \
      --pidfile "$dir/docker.pid" >"$dir/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 1 60); do
      if DOCKER_HOST=$sock docker version >/dev/null 2>&1; then
        echo "export DOCKER_HOST=$sock"; exit 0
      fi
      sleep 0.5
    done
    tail -20 "$dir/dockerd.log" >&2; echo "dockerd did not start" >&2; exit 1 ;;
  stop)
    [ -f "$dir/docker.pid" ] || exit 0
    pid=$(cat "$dir/docker.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.5; done
    echo "dockerd $pid still running" >&2; exit 1 ;;
  *) echo "usage: dockerd-local.sh start|stop [DIR]" >&2; exit 2 ;;
esac
