#!/usr/bin/env bash
# Build every dyadlab image: the base (and its builder stage), the thin
# service images, the CLI and TorchServe.
#
#   deploy/build.sh [--tag TAG] [--ci] [--only "base extractor ..."]
#
# Environment (all optional): DOCKER (docker or podman; default docker),
# BASE_IMAGE, PIP_INDEX_URL, TORCH_INDEX_URL, DEBIAN_MIRROR (the base image's
# build args, deploy/docker/base/Dockerfile), DYADLAB_IMAGE_PREFIX (default
# "dyadlab/"; e.g. registry.example.org/dyadlab/). --ci also builds the two
# stand-ins that docker-compose.ci.yml uses (an S3 server from OpenStack Swift
# and Prometheus from Debian's package), which need no registry.
# Prints one line per image: name, seconds, size.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
PREFIX=${DYADLAB_IMAGE_PREFIX:-dyadlab/}
TAG=latest CI_IMAGES=0 ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --ci) CI_IMAGES=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
# Docker >= 23 without the buildx plugin cannot use BuildKit: the classic
# builder builds these Dockerfiles as well (they need no BuildKit feature).
if [ "$DOCKER" = docker ] && [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi
args=()
for v in BASE_IMAGE PIP_INDEX_URL TORCH_INDEX_URL DEBIAN_MIRROR; do
  if [ -n "${!v+x}" ]; then args+=(--build-arg "$v=${!v}"); fi
done
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
size() { $DOCKER image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}'; }
build() {  # name, then docker build arguments
  local name=$1; shift
  local t0=$SECONDS
  local log
  log=$(mktemp)
  if ! nice -n "${NICE:-15}" $DOCKER build --force-rm "$@" >"$log" 2>&1; then
    tail -40 "$log" >&2; rm -f "$log"
    echo "build of $name failed" >&2; exit 1
  fi
  rm -f "$log"
  printf '%-28s %4ds  %s\n' "$name" $((SECONDS - t0)) "$(size "$name")"
}
if wanted base; then
  build "${PREFIX}builder:$TAG" -f deploy/docker/base/Dockerfile --target builder "${args[@]}" \
    -t "${PREFIX}builder:$TAG" .
  build "${PREFIX}base:$TAG" -f deploy/docker/base/Dockerfile "${args[@]}" -t "${PREFIX}base:$TAG" .
fi
for svc in extractor smiles stats synth cli; do
  wanted "$svc" || continue
  build "${PREFIX}$svc:$TAG" --build-arg "BASE=${PREFIX}base:$TAG" -t "${PREFIX}$svc:$TAG" \
    "deploy/docker/$svc"
done
if wanted torchserve; then
  dm=(); [ -n "${DEBIAN_MIRROR:-}" ] && dm=(--build-arg "DEBIAN_MIRROR=$DEBIAN_MIRROR")
  build "${PREFIX}torchserve:$TAG" --build-arg "BASE=${PREFIX}base:$TAG" \
    --build-arg "BUILDER=${PREFIX}builder:$TAG" "${dm[@]}" -t "${PREFIX}torchserve:$TAG" \
    deploy/docker/torchserve
fi
if [ "$CI_IMAGES" = 1 ]; then
  build "dyadlab-ci/swift-s3:$TAG" -f deploy/docker/ci/swift-s3/Dockerfile "${args[@]}" \
    -t "dyadlab-ci/swift-s3:$TAG" .
  build "dyadlab-ci/prometheus:$TAG" "${args[@]}" -t "dyadlab-ci/prometheus:$TAG" \
    deploy/docker/ci/prometheus
fi
