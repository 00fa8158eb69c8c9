#!/usr/bin/env bash
# Prints the name of a local base image for the Dockerfile (`--build-arg BASE=...`), building it
# once if needed: Debian bookworm with Python 3.11 and its venv module, the same as
# python:3.11-slim-bookworm as far as the Dockerfile cares, but made from Debian's packages with
# debootstrap, for machines that reach Debian's mirror but no container registry.
#
# The machine's own extra CA certificates (/usr/local/share/ca-certificates: a company's, or an
# egress proxy's) are trusted in the image too, so pip inside `docker build` reaches what pip here
# reaches. Images for others should be built FROM python:3.11-slim-bookworm instead.
#
# The root filesystem is cached outside the clone as a tarball, keyed by this script and those
# certificates, and imported into docker under a tag with the same key; a warm machine finds the
# tag and does nothing.
set -euo pipefail
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=python3,python3-venv,ca-certificates
LOCAL_CAS=/usr/local/share/ca-certificates
key="$( (cat "${BASH_SOURCE[0]}"; find "$LOCAL_CAS" -name '*.crt' -type f -print0 2>/dev/null | sort -z | xargs -0r cat) \
  | sha256sum | cut -c1-12)"
IMAGE="kubetune-base:$SUITE-$key"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/images"
TARBALL="$CACHE/base-$SUITE-$key.tar"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE"; exit 0
fi
if [[ ! -f "$TARBALL" ]]; then
  [[ $EUID -eq 0 ]] || { echo "hack/images/base.sh: debootstrap needs root" >&2; exit 1; }
  command -v debootstrap >/dev/null || { echo "hack/images/base.sh: apt-get install debootstrap" >&2; exit 1; }
  echo "hack/images/base.sh: debootstrap $SUITE ($PACKAGES) from $MIRROR" >&2
  mkdir -p "$CACHE"
  root="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; exit 1; }
  rm -f "$root.log"
  if compgen -G "$LOCAL_CAS/*.crt" >/dev/null; then
    cp "$LOCAL_CAS"/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
    # pip trusts its own bundled list unless told to use the system's.
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
  fi
  # What an image does not need: downloaded packages, apt lists, documentation.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
  tar -C "$root" --numeric-owner -cf "$TARBALL.partial" .
  mv "$TARBALL.partial" "$TARBALL"
fi
docker import --change 'CMD ["python3"]' "$TARBALL" "$IMAGE" >/dev/null
# Older bases (an earlier version of this script) go; images built on them keep their layers.
docker images --format '{{.Repository}}:{{.Tag}}' kubetune-base | grep -vxF "$IMAGE" \
  | xargs -r docker rmi >/dev/null 2>&1 || true
find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "${TARBALL##*/}" -delete
echo "$IMAGE"
