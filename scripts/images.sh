#!/usr/bin/env bash
# `make images`: the four service images from the one Dockerfile, with whichever of docker,
# podman or buildah works here (CONTAINER_TOOL=... to choose).
#
#   IMAGE_PREFIX=registry/path/ TAG=1.2.3 make images
#   BASE_IMAGE=localhost/debian:12-slim make images     # a locally made base (make image-base)
#
# With podman or buildah, the machine's CA bundle is mounted into the build beside the image's
# own (never over it) and pip is told to use it: where PyPI is reached through a proxy that
# re-signs TLS, pip inside the build trusts what pip outside it trusts. apt in the build uses
# the host's network.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${IMAGE_PREFIX:-}
tag=${TAG:-dev}
base=${BASE_IMAGE:-}
services=${SERVICES:-frontend policy rewriter relay}

tool=${CONTAINER_TOOL:-}
if [ -z "$tool" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then tool=docker
  elif command -v podman >/dev/null 2>&1; then tool=podman
  elif command -v buildah >/dev/null 2>&1; then tool=buildah
  else echo "make images needs docker, podman or buildah" >&2; exit 1
  fi
fi

args=(--build-arg "VERSION=$tag" --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
      --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
if [ -n "$base" ]; then
  args+=(--build-arg "BUILD_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$base")
fi
if [ "$tool" != docker ]; then
  args+=(--network host)
  ca=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
  if [ -f "$ca" ]; then
    conf=$(mktemp)
    trap 'rm -f "$conf"' EXIT
    printf '[global]\ncert = /etc/host-ca.crt\n' > "$conf"
    chmod 644 "$conf"
    args+=(-v "$ca:/etc/host-ca.crt:ro" -v "$conf:/etc/pip.conf:ro")
  fi
fi

build() {  # build TARGET NAME
  case "$tool" in
    buildah) buildah bud --layers "${args[@]}" --target "$1" -t "$2" . ;;
    *) "$tool" build "${args[@]}" --target "$1" -t "$2" . ;;
  esac
}

for s in $services; do
  echo "== ${prefix}submitd-$s:$tag ($tool)"
  build "$s" "${prefix}submitd-$s:$tag"
done
