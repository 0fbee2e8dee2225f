#!/usr/bin/env bash
# Build the filedock image from the top-level Dockerfile with buildah: no Docker engine,
# no registry. As root (chroot isolation, vfs storage).
#
# The base image the Dockerfile starts FROM is a stand-in for python:3.11-slim-bookworm
# made here with debootstrap (Debian bookworm with python3, python3-venv and python3-pip),
# since no registry but PyPI, Debian and npm can be reached. It is built once and kept in
# the cache folder ($FILEDOCK_IMAGE_CACHE, default /var/tmp/filedock-image-cache) under a
# tag derived from what went into it; later runs only rebuild the Dockerfile.
#
# Usage: deploy/image/build-test-image.sh [--base IMAGE] [--tag IMAGE]
#   --base IMAGE  build FROM this image (already in the cache's store) instead of the
#                 debootstrap stand-in, e.g. a python:3.11-slim-bookworm pulled there
#   --tag IMAGE   name of the result (default $FILEDOCK_IMAGE, localhost/filedock:test)
# Environment: DEBIAN_MIRROR (default: the bookworm mirror of apt's sources on this
# machine, else http://deb.debian.org/debian), FILEDOCK_IMAGE_CACHE.
# Prints the image name on stdout; progress and timings go to stderr.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=deploy/image/common.sh
. "$HERE/common.sh"

SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
BASE_RECIPE=1 # bump when the recipe below changes, so cached bases are rebuilt

base=""
while [ $# -gt 0 ]; do
    case "$1" in
    --base) base=$2; shift 2 ;;
    --tag) FILEDOCK_IMAGE=$2; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (buildah chroot isolation and debootstrap need it)"
for tool in buildah debootstrap flock sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install buildah debootstrap)"
done

# The first bookworm (not -security) mirror in apt's sources, deb822 or one-line format.
debian_mirror() {
    local uri
    if [ -n "${DEBIAN_MIRROR:-}" ]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        uri=$(awk -v suite="$SUITE" 'BEGIN { RS = "" } {
            uri = ""; ok = 0; n = split($0, line, "\n")
            for (i = 1; i <= n; i++) {
                if (line[i] ~ /^URIs:/) { split(line[i], a, " "); uri = a[2] }
                if (line[i] ~ /^Suites:/) {
                    m = split(line[i], s, " ")
                    for (j = 2; j <= m; j++) if (s[j] == suite) ok = 1
                }
            }
            if (ok && uri != "") { print uri; exit }
        }' "$f")
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(awk -v suite="$SUITE" '$1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
            if ($(i + 1) == suite) { print $i; exit }
        }' "$f")
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    echo http://deb.debian.org/debian
}

build_base() {
    local tag=$1 mirror=$2 rootfs ctr mnt keyring=()
    rootfs="$FILEDOCK_IMAGE_CACHE/debootstrap.$$"
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    if [ -r /usr/share/keyrings/debian-archive-keyring.gpg ]; then
        keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    fi
    log "debootstrap $SUITE from $mirror with $PACKAGES"
    debootstrap --variant=minbase --include="$PACKAGES" "${keyring[@]}" \
        "$SUITE" "$rootfs" "$mirror" >"$FILEDOCK_IMAGE_CACHE/debootstrap.log" 2>&1 ||
        { tail -n 30 "$FILEDOCK_IMAGE_CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
    chroot "$rootfs" python3 -c 'import ensurepip, ssl, venv' || die "the base has no working python3"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/log/* "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
    ctr=$(bah from --pull=never scratch)
    mnt=$(bah mount "$ctr")
    cp -a "$rootfs/." "$mnt/"
    bah umount "$ctr" >/dev/null
    bah config \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 \
        --cmd python3 \
        --label org.opencontainers.image.description="filedock test stand-in for python:3.11-slim-bookworm (debootstrap $SUITE)" \
        "$ctr"
    bah commit --quiet --format docker --rm "$ctr" "$tag" >/dev/null
    rm -rf "$rootfs"
}

mkdir -p "$FILEDOCK_IMAGE_CACHE"
exec 9>"$FILEDOCK_IMAGE_CACHE/lock"
flock 9 # one build at a time per cache folder

start=$SECONDS
if [ -z "$base" ]; then
    mirror=$(debian_mirror)
    key=$(printf '%s\n' "$SUITE" "$PACKAGES" "$mirror" "$BASE_RECIPE" | sha256sum | cut -c1-12)
    base="localhost/filedock-base:$SUITE-$key"
    if bah inspect --type image "$base" >/dev/null 2>&1; then
        log "base $base: cached"
    else
        build_base "$base" "$mirror"
        log "base $base: built in $((SECONDS - start))s"
    fi
fi

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/service/__init__.py")
revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
# The CA bundle pip trusts on this machine (it may hold a TLS-inspecting proxy's CA
# that the base image lacks) goes in as a build secret, not into the image.
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
secret=()
[ -s "$ca" ] && secret=(--secret "id=pip-ca,src=$ca")
step=$SECONDS
log "building $FILEDOCK_IMAGE FROM $base"
bah build "${secret[@]}" --quiet --isolation chroot --format docker --pull=never --layers=false \
    --build-arg BASE="$base" \
    --build-arg VERSION="${version:-0}" \
    --build-arg REVISION="$revision" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --file "$REPO/Dockerfile" --tag "$FILEDOCK_IMAGE" "$REPO" >&2
# Each rebuild leaves the previous image untagged; vfs keeps full copies, so drop them.
bah rmi --prune >/dev/null 2>&1 || true
log "image $FILEDOCK_IMAGE: built in $((SECONDS - step))s (total $((SECONDS - start))s)"
echo "$FILEDOCK_IMAGE"
