#!/usr/bin/env bash
# Builds every image docker-compose.yml runs, on a machine that cannot pull from a public image registry:
#   1. prefix-serve/base:bookworm  Debian bookworm (debootstrap --variant=minbase) with python3, imported into Docker;
#                                  skipped when BASE_IMAGE names another base (e.g. python:3.11-slim, or a CUDA
#                                  pytorch/pytorch image whose torch is kept).
#   2. prefix-serve/redis:7        Debian's redis-server 7 on that Debian base (redis:7-alpine cannot be pulled here).
#   3. prefix-serve/service, prefix-serve/trainer  docker/service.Dockerfile and docker/trainer.Dockerfile.
# `docker/build-base.sh base` stops after 2. An image that already exists is kept (REBUILD=1 rebuilds the base and
# redis images); the project images are always rebuilt, from Docker's layer cache (seconds when nothing changed).
#
# Settings (environment):
#   BASE_IMAGE     the base of the project images (default: prefix-serve/base:bookworm, made here)
#   TAG            tag of the project images (default: latest)
#   DEBIAN_MIRROR  where debootstrap and apt take Debian packages (default: http://deb.debian.org/debian)
#   TORCH_SPEC     the torch the CPU images install (default: torch==2.13.0); its wheel is fetched on the host with
#                  the host's pip configuration into docker/wheels/ (a local file or mirror reachable only from here
#                  is then usable in the build); if that fails the build installs it from TORCH_INDEX_URL instead
#   TORCH_INDEX_URL  where that wheel comes from (default: https://download.pytorch.org/whl/cpu)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL  passed to pip inside the build (only http(s) indexes are reachable there)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

DEBIAN_BASE=prefix-serve/base:bookworm
REDIS_IMAGE=prefix-serve/redis:7
BASE_IMAGE="${BASE_IMAGE:-$DEBIAN_BASE}"
TAG="${TAG:-latest}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
REBUILD="${REBUILD:-0}"

die() {
  echo "build-base.sh: $*" >&2
  exit 1
}
log() { echo "==> $*" >&2; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

command -v docker >/dev/null || die "the docker CLI is not installed (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 \
  || die "no Docker engine answers: start it (as root: dockerd >/tmp/dockerd.log 2>&1 &) and run this again"

# The Debian base: a minimal bookworm root file system with python3 and CA certificates, imported as one layer.
# Only the interpreter: the builder stage of the Dockerfiles adds python3-venv, so pip never reaches the runtime.
make_debian_base() {
  [ "$(id -u)" = 0 ] || die "debootstrap needs root to make $DEBIAN_BASE: run this as root, or set BASE_IMAGE \
to an image you can pull (e.g. BASE_IMAGE=python:3.11-slim)"
  if ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || die "debootstrap is missing and there is no apt-get to install it"
    log "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  local rootfs
  rootfs="$(mktemp -d /tmp/prefix-serve-rootfs.XXXXXX)"
  # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
  trap "rm -rf '$rootfs'" EXIT
  log "debootstrap bookworm into $rootfs (from $DEBIAN_MIRROR)"
  timeout 900 debootstrap --variant=minbase --include=python3,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >/tmp/prefix-serve-debootstrap.log 2>&1 \
    || die "debootstrap failed (log: /tmp/prefix-serve-debootstrap.log); is $DEBIAN_MIRROR reachable?"
  # Security and point-release updates: debootstrap takes only the release as it shipped.
  local mirror_host="${DEBIAN_MIRROR%/debian}"
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb $mirror_host/debian-security bookworm-security main
EOF
  timeout 600 chroot "$rootfs" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' \
    >>/tmp/prefix-serve-debootstrap.log 2>&1 \
    || die "apt-get upgrade in the new root failed (log: /tmp/prefix-serve-debootstrap.log)"
  # No package lists, downloaded .debs or logs in the image.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/* "$rootfs"/tmp/*
  log "importing $DEBIAN_BASE"
  tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    -c 'CMD ["/bin/bash"]' - "$DEBIAN_BASE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
}

if [ "$BASE_IMAGE" = "$DEBIAN_BASE" ]; then
  if [ "$REBUILD" = 1 ] || ! have_image "$DEBIAN_BASE"; then make_debian_base; fi
elif ! have_image "$BASE_IMAGE"; then
  log "pulling $BASE_IMAGE"
  docker pull "$BASE_IMAGE" >/dev/null || die "cannot pull $BASE_IMAGE: unset BASE_IMAGE to build a Debian base here"
fi

# Redis for compose: Debian's redis-server on the Debian base, whatever BASE_IMAGE the project images use.
if [ "$REBUILD" = 1 ] || ! have_image "$REDIS_IMAGE"; then
  have_image "$DEBIAN_BASE" || make_debian_base
  log "building $REDIS_IMAGE"
  docker build --network host --build-arg "BASE_IMAGE=$DEBIAN_BASE" -t "$REDIS_IMAGE" - <docker/redis.Dockerfile >&2
fi
[ "${1:-}" = base ] && exit 0

# The CPU torch wheel, fetched here where the host's pip configuration (local wheels, find-links) applies, from
# TORCH_INDEX_URL rather than PyPI (whose Linux torch is the CUDA build), then installed in the build from the
# context. Only for the image's Python, and not when the base image has torch (the build keeps that one).
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
mkdir -p docker/wheels docker/certs
torch_version="${TORCH_SPEC#torch==}"
if [ "$torch_version" = "$TORCH_SPEC" ] || ! ls docker/wheels/torch-"$torch_version"[-+]*.whl >/dev/null 2>&1; then
  probe='import importlib.util as u, sys; v = sys.version_info; print(f"{v[0]}{v[1]}", int(bool(u.find_spec("torch"))))'
  read -r py has_torch < <(docker run --rm "$BASE_IMAGE" python -c "$probe") \
    || die "cannot run \`python\` in $BASE_IMAGE: the base image needs Python 3.11 on PATH as \`python\`"
  if [ "$has_torch" = 0 ]; then
    log "fetching the $TORCH_SPEC wheel (cp$py) into docker/wheels/"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
      --platform "manylinux_2_28_$(uname -m)" --index-url "$TORCH_INDEX_URL" -d docker/wheels "$TORCH_SPEC" \
      || log "no $TORCH_SPEC wheel from the host's pip: the build installs it from $TORCH_INDEX_URL"
  fi
fi
# The host's CA bundle for pip in the builder stage, in case the registries are reached through an intercepting proxy.
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt docker/certs/ca-bundle.crt

for name in service trainer; do
  log "building prefix-serve/$name:$TAG on $BASE_IMAGE"
  docker build --network host -f "docker/$name.Dockerfile" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "TORCH_SPEC=$TORCH_SPEC" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
    ${PIP_INDEX_URL:+--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"} \
    ${PIP_EXTRA_INDEX_URL:+--build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL"} \
    -t "prefix-serve/$name:$TAG" . >&2
done
docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^prefix-serve/'
