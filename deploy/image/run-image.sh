#!/usr/bin/env bash
# Run an image from the build cache the way the Kubernetes manifests run it, without a
# container engine (as root): the image's root filesystem read-only, a tmpfs at /tmp, the
# given volumes, the image's USER, ENV, WORKDIR, ENTRYPOINT and CMD, no_new_privs, and
# new PID and mount namespaces, so the entrypoint is PID 1 as in a pod. The network is the
# host's: a port the service listens on is reachable on this machine's loopback.
#
# Usage: deploy/image/run-image.sh [options] [IMAGE] [-- ARG...]
#   -v HOST_DIR:CONTAINER_DIR[:ro]  bind a folder (repeatable)
#   -e NAME=VALUE                   set an environment variable (repeatable)
#   -u UID:GID                      run as this user instead of the image's USER
#   --pidfile FILE                  write the host PID of the container's PID 1 to FILE
#   IMAGE                           default $FILEDOCK_IMAGE (localhost/filedock:test)
#   ARG...                          replace the image's CMD (the ENTRYPOINT stays)
# SIGTERM or SIGINT to this script goes to the container's PID 1 (like `docker stop`);
# the exit status is PID 1's.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/image/common.sh
. "$HERE/common.sh"

volumes=()
extra_env=()
user=""
pidfile=""
args=()
have_args=0
while [ $# -gt 0 ]; do
    case "$1" in
    -v) volumes+=("$2"); shift 2 ;;
    -e) extra_env+=("$2"); shift 2 ;;
    -u) user=$2; shift 2 ;;
    --pidfile) pidfile=$2; shift 2 ;;
    --) shift; args=("$@"); have_args=1; break ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) die "unknown option: $1" ;;
    *) FILEDOCK_IMAGE=$1; shift ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (namespaces, chroot and mounts need it)"

image_config() {
    bah inspect --type image --format "$1" "$FILEDOCK_IMAGE"
}
lines() { # one array element per non-empty line
    local line
    while IFS= read -r line; do [ -n "$line" ] && printf '%s\0' "$line"; done
}
mapfile -d '' entrypoint < <(image_config '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' | lines)
mapfile -d '' cmd < <(image_config '{{range .OCIv1.Config.Cmd}}{{println .}}{{end}}' | lines)
mapfile -d '' image_env < <(image_config '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' | lines)
workdir=$(image_config '{{.OCIv1.Config.WorkingDir}}')
[ -n "$user" ] || user=$(image_config '{{.OCIv1.Config.User}}')
[ "$have_args" = 1 ] && cmd=("${args[@]}")
argv=("${entrypoint[@]}" "${cmd[@]}")
[ ${#argv[@]} -gt 0 ] || die "the image has no ENTRYPOINT or CMD and no arguments were given"

ctr=$(bah from --pull=never --quiet "$FILEDOCK_IMAGE")
upid=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    if [ -n "$upid" ] && kill -0 "$upid" 2>/dev/null; then
        kill -KILL "$upid" 2>/dev/null || true # --kill-child takes the container with it
        wait "$upid" 2>/dev/null || true
    fi
    bah umount "$ctr" >/dev/null 2>&1 || true
    bah rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
rootfs=$(bah mount "$ctr")

# USER may be a name: resolve it in the image's own passwd and group files.
uid=${user%%:*}
gid=""
[ "$user" != "$uid" ] && gid=${user#*:}
[ -n "$uid" ] || uid=0
if ! [[ "$uid" =~ ^[0-9]+$ ]]; then
    entry=$(awk -F: -v u="$uid" '$1 == u { print $3 ":" $4 }' "$rootfs/etc/passwd")
    [ -n "$entry" ] || die "user $uid is not in the image's /etc/passwd"
    uid=${entry%%:*}
    [ -n "$gid" ] || gid=${entry#*:}
fi
if [ -n "$gid" ] && ! [[ "$gid" =~ ^[0-9]+$ ]]; then
    gid=$(awk -F: -v g="$gid" '$1 == g { print $3 }' "$rootfs/etc/group")
    [ -n "$gid" ] || die "group ${user#*:} is not in the image's /etc/group"
fi
[ -n "$gid" ] || gid=$uid

# Mount points must exist before the root becomes read-only (this working container is
# thrown away afterwards, so creating them changes nothing that persists).
for spec in "${volumes[@]}"; do
    dst=${spec#*:}
    dst=${dst%%:*}
    mkdir -p "$rootfs$dst"
done
mkdir -p "$rootfs/tmp" "$rootfs/proc" "$rootfs/dev" "$rootfs/etc"
touch "$rootfs/etc/hosts" "$rootfs/etc/resolv.conf"

# Runs inside the new namespaces (bash -c "$(declare -f inner); inner" below).
# shellcheck disable=SC2317,SC2016
inner() {
    set -eu
    mount --bind "$rootfs" "$rootfs"
    mount -o remount,bind,ro "$rootfs"
    mount -t proc -o nosuid,nodev,noexec proc "$rootfs/proc"
    mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m tmpfs "$rootfs/tmp"
    mount -t tmpfs -o mode=755,nosuid,size=64k tmpfs "$rootfs/dev"
    for dev in null zero full random urandom tty; do
        touch "$rootfs/dev/$dev"
        mount --bind "/dev/$dev" "$rootfs/dev/$dev"
    done
    ln -s /proc/self/fd "$rootfs/dev/fd"
    ln -s /proc/self/fd/0 "$rootfs/dev/stdin"
    ln -s /proc/self/fd/1 "$rootfs/dev/stdout"
    ln -s /proc/self/fd/2 "$rootfs/dev/stderr"
    mkdir "$rootfs/dev/shm"
    mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m tmpfs "$rootfs/dev/shm"
    for f in /etc/hosts /etc/resolv.conf; do
        mount --bind "$f" "$rootfs$f"
        mount -o remount,bind,ro "$rootfs$f"
    done
    for spec in "${volumes[@]}"; do
        local src=${spec%%:*} rest=${spec#*:} dst
        dst=${rest%%:*}
        mount --bind "$src" "$rootfs$dst"
        [ "$rest" = "$dst:ro" ] && mount -o remount,bind,ro "$rootfs$dst"
    done
    local run=("${argv[@]}")
    if [ -n "$workdir" ] && [ "$workdir" != / ]; then
        run=(/bin/sh -c 'cd "$0" && exec "$@"' "$workdir" "${argv[@]}")
    fi
    # Every step execs: the entrypoint ends up as PID 1 of the new PID namespace.
    exec env -i "${image_env[@]}" "${extra_env[@]}" HOSTNAME="$(hostname)" \
        "$(command -v setpriv)" --no-new-privs \
        "$(command -v chroot)" --userspec="$uid:$gid" --groups="$gid" "$rootfs" "${run[@]}"
}

script="$(declare -p rootfs volumes argv workdir image_env extra_env uid gid); $(declare -f inner); inner"
unshare --mount --pid --fork --kill-child -- bash -c "$script" &
upid=$!

# The container's PID 1 is unshare's only child (once the background job is unshare).
child=""
for _ in $(seq 200); do
    child=""
    [ "$(cat "/proc/$upid/comm" 2>/dev/null)" = unshare ] &&
        child=$(cat "/proc/$upid/task/$upid/children" 2>/dev/null || true)
    child=${child%% *}
    [ -n "$child" ] && break
    kill -0 "$upid" 2>/dev/null || break
    sleep 0.05
done
[ -n "$pidfile" ] && [ -n "$child" ] && echo "$child" >"$pidfile"

interrupted=0
# shellcheck disable=SC2317 # called by the TERM and INT traps
forward() {
    interrupted=1
    if [ -n "$child" ]; then kill -s "$1" "$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT

# A trapped signal interrupts `wait` (status > 128); wait again for the real status.
while :; do
    if wait "$upid"; then status=0; else status=$?; fi
    if [ "$status" -gt 128 ] && [ "$interrupted" = 1 ]; then
        interrupted=0
        continue
    fi
    break
done
upid=""
exit "$status"
