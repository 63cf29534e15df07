#!/usr/bin/env bash
# Build every image on a machine that reaches PyPI and a Debian mirror but no
# image registry (this project's CI; many air-gapped sites look the same):
#
#   1. a base OS image without a registry: debootstrap --variant=minbase
#      bookworm (+ python3, python3-venv, ca-certificates) from the mirror in
#      the machine's apt sources, imported as local/python:3.11-bookworm
#      (kept; --rebuild-base makes it again);
#   2. deploy/docker/extra/: the machine's locally added CA certificates
#      (/usr/local/share/ca-certificates/*.crt) and the wheels in pip's
#      find-links directory (here: the CPU build of torch);
#   3. deploy/build.sh with BASE_IMAGE=local/python:3.11-bookworm and no
#      torch index (the local wheel is the CPU build).
#
#   deploy/build-local.sh [--rebuild-base] [build.sh options: --tag T --ci --only "..."]
#
# Needs root (debootstrap), docker (or DOCKER=podman) and debootstrap
# (apt-get install debootstrap). DEBIAN_MIRROR overrides the mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
BASE=local/python:3.11-bookworm
REBUILD=0
if [ "${1:-}" = --rebuild-base ]; then REBUILD=1; shift; fi

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
           | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' \
           | grep -v security | head -1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
fi

t0=$SECONDS
if [ "$REBUILD" = 1 ] || ! $DOCKER image inspect "$BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
  rootfs=$(mktemp -d /var/tmp/dyadlab-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm from $mirror ..."
  nice -n "${NICE:-15}" debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
         "$rootfs"/usr/share/locale/* "$rootfs"/tmp/* "$rootfs"/root/.cache
  mkdir -p "$rootfs"/usr/share/man/man1
  echo "deb $mirror bookworm main" > "$rootfs"/etc/apt/sources.list
  tar -C "$rootfs" -c . | $DOCKER import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >/dev/null
  rm -rf "$rootfs"; trap - EXIT
  printf '%-28s %4ds  %s\n' "$BASE" $((SECONDS - t0)) \
    "$($DOCKER image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}')"
fi

# build-only inputs (deploy/docker/extra/README.md)
extra=deploy/docker/extra
rm -f "$extra"/ca/*.crt "$extra"/wheels/*.whl
cp /usr/local/share/ca-certificates/*.crt "$extra"/ca/ 2>/dev/null || true
links=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
for d in $links; do
  d=${d#file://}
  [ -d "$d" ] || continue
  for w in "$d"/*.whl; do
    [ -e "$w" ] || continue
    ln "$w" "$extra/wheels/" 2>/dev/null || cp "$w" "$extra/wheels/"
  done
done
echo "extra: $(ls "$extra"/ca/*.crt 2>/dev/null | wc -l) CA certificate(s), $(ls "$extra"/wheels/*.whl 2>/dev/null | wc -l) wheel(s)"

BASE_IMAGE=$BASE TORCH_INDEX_URL="" DOCKER=$DOCKER \
  exec deploy/build.sh "$@"
