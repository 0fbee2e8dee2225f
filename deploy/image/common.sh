# shellcheck shell=bash
# Shared by build-test-image.sh and run-image.sh (sourced, not run).
#
# Everything buildah keeps (the stand-in base, the built images, working containers)
# lives in one cache folder outside the repository, with the vfs storage driver: it
# needs no overlay or fuse support from the kernel and no daemon.

FILEDOCK_IMAGE_CACHE=${FILEDOCK_IMAGE_CACHE:-/var/tmp/filedock-image-cache}
FILEDOCK_IMAGE=${FILEDOCK_IMAGE:-localhost/filedock:test}

bah() {
    buildah --root "$FILEDOCK_IMAGE_CACHE/storage" \
        --runroot "$FILEDOCK_IMAGE_CACHE/run" \
        --storage-driver vfs "$@"
}

log() {
    printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}
