#!/usr/bin/env bash
# Build the Debian base image (python3, venv, tini, CA bundle) from the apt mirror this machine uses,
# for sites that cannot pull python:3.11-slim-bookworm from a registry (and for our tests and CI).
#   docker/build-base.sh [TAG]          (default lm-pipeline-base:bookworm; needs root and debootstrap)
# The mirror is the first "URIs:" of /etc/apt/sources.list.d/*.sources (or sources.list), or $DEBIAN_MIRROR.
set -euo pipefail
TAG="${1:-lm-pipeline-base:bookworm}"
DOCKER="${DOCKER:-docker}"
SUITE="${DEBIAN_SUITE:-bookworm}"

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1 && [ -z "${FORCE:-}" ]; then
    echo "base image $TAG exists (FORCE=1 rebuilds it)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 2; }

mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
fi
if [ -z "$mirror" ]; then
    mirror=$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1 || true)
fi
[ -n "$mirror" ] || { echo "no Debian mirror found: set DEBIAN_MIRROR" >&2; exit 2; }

rootfs=$(mktemp -d /tmp/lmpipe-rootfs.XXXXXX)
trap 'rm -rf --one-file-system "$rootfs"' EXIT
echo "debootstrap $SUITE from $mirror -> $TAG"
# minbase: no compilers, no docs; python3-venv brings ensurepip (pip and setuptools wheels) for the venvs
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini \
    "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -30 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
# apt lists and the package cache are not needed at run time
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar -C "$rootfs" -c . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "lm-pipeline base: debootstrap $SUITE minbase from $mirror" - "$TAG"
"$DOCKER" image inspect "$TAG" --format '{{.Id}} {{.Size}}'
