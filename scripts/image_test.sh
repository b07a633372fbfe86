#!/usr/bin/env bash
# Builds the container image and checks it from outside with the real client.
#
#   scripts/image_test.sh build     `make image`: build Containerfile with buildah, podman or docker
#   scripts/image_test.sh test      `make image-test`: build on a local Debian base, run, check (root, Debian)
#
# build: IMAGE (default pagedgen:cpu), CONTAINERFILE (default Containerfile), BASE (a base image
# other than the Containerfile's default), IMAGE_BUILD_ARGS (more arguments for the build tool).
#
# test: for a machine like CI's (root, Debian, no container registry reachable). It installs buildah and
# mmdebstrap with apt-get when they are missing, builds a Debian base with mmdebstrap, builds Containerfile
# on it (--build-arg BASE=...) with this machine's pip configuration lent read-only to the build (its
# settings, and the wheel directories, indexes and CA bundle they name), then runs `pagedgen serve`
# inside the image through the image's entrypoint (buildah run --isolation chroot: host network, the
# image's non-root user, /tmp and the socket directory mounted from outside, the API key from a mounted
# file) and checks from outside: health SERVING over TCP and the Unix socket, `pagedgen health` exit codes
# (inside the image too: the HEALTHCHECK command), the API key, a greedy streamed Generate equal to the
# same request against `.venv/bin/pagedgen serve` outside the image, 16 concurrent streams, then SIGTERM
# during a stream: NOT_SERVING, the stream finishes, exit 0 within the grace period; and that nothing
# was written to the image's root filesystem. It prints the image size, the build time, the time from
# start to SERVING and the RSS of the container's processes idle and under the 16 streams.
# PAGEDGEN_IMAGE_WORK: work directory (default /var/tmp/pagedgen-image-test);
# PAGEDGEN_IMAGE_NO_CACHE=1: rebuild every layer (pip's cache mount stays warm; empty it for a cold
# build: rm -rf /var/tmp/buildah-cache); PAGEDGEN_IMAGE_BUILD_ONLY=1: stop after the build.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-pagedgen:cpu}
CONTAINERFILE=${CONTAINERFILE:-Containerfile}
BUILDAH_FLAGS=(--isolation chroot --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

build_image() {
    local args=(-f "$CONTAINERFILE" -t "$IMAGE")
    [[ -n ${BASE:-} ]] && args+=(--build-arg "BASE=$BASE")
    # shellcheck disable=SC2206  # IMAGE_BUILD_ARGS is a list of words on purpose
    args+=(${IMAGE_BUILD_ARGS:-})
    if command -v buildah >/dev/null; then
        buildah bud "${BUILDAH_FLAGS[@]}" --layers --format docker "${args[@]}" .
    elif command -v podman >/dev/null; then
        podman build --format docker "${args[@]}" .
    elif command -v docker >/dev/null; then
        docker build "${args[@]}" .
    else
        echo "image: none of buildah, podman or docker is installed" >&2
        exit 1
    fi
}

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

install_tools() {
    [[ $(id -u) == 0 ]] || { echo "image-test: run as root (buildah, mmdebstrap)" >&2; exit 1; }
    if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends buildah mmdebstrap \
            ca-certificates >/dev/null
    fi
}

# A Debian base with Python (what the official python images hold), from Debian's archive.
build_base() {
    local base=$1 work=$2
    if buildah inspect --type image "$base" >/dev/null 2>&1; then
        echo "image-test: base $base exists"
        return
    fi
    local t0
    t0=$(now)
    mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$work/rootfs.tar"
    local ctr
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
    buildah config --cmd /bin/sh "$ctr"
    buildah commit --quiet "$ctr" "$base" >/dev/null
    buildah rm "$ctr" >/dev/null
    rm -f "$work/rootfs.tar"
    echo "image-test: base $base built in $(since "$t0") s"
}

# This machine's pip settings as one pip.conf, and --volume flags for it and every local path it names.
pip_volumes() {
    local work=$1
    python3 -m pip config list 2>/dev/null | python3 -c '
import os, re, sys
work, values = sys.argv[1], {}
for line in sys.stdin:
    m = re.match(r"^(:env:|[a-z]+)\.([a-z-]+)=(.*)$", line.strip())
    if m and (m[1] == ":env:" or m[2] not in values):
        values[m[2]] = m[3].strip("\x27\"")
with open(os.path.join(work, "pip.conf"), "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
print(f"--volume={work}/pip.conf:/etc/pip.conf:ro")
paths = set()
for value in values.values():
    for word in value.split():
        path = word[len("file://"):] if word.startswith("file://") else word
        if path.startswith("/") and os.path.exists(path):
            # an index directory links to files beside it: lend its parent
            paths.add(os.path.dirname(path.rstrip("/")) if os.path.isdir(path) and path.rstrip("/").endswith("/simple") else path)
for path in sorted(paths):
    print(f"--volume={path}:{path}:ro")
' "$work"
}

test_image() {
    install_tools
    local work=${PAGEDGEN_IMAGE_WORK:-/var/tmp/pagedgen-image-test}
    local base=localhost/pagedgen-base:bookworm image=localhost/pagedgen:cpu-test
    local py=.venv/bin/python
    [[ -x $py ]] || { echo "image-test: needs .venv (make setup)" >&2; exit 1; }
    mkdir -p "$work"
    build_base "$base" "$work"

    local volumes
    mapfile -t volumes < <(pip_volumes "$work")
    local flags=(--layers --format docker -f Containerfile --build-arg "BASE=$base" "${volumes[@]}" -t "$image")
    # Where this machine's pip names its own index or wheels, torch comes from there too (here: the CPU
    # wheel that PyTorch's index, the Containerfile's default, would give but cannot be reached for).
    if grep -qE '^(index-url|extra-index-url|find-links) = ' "$work/pip.conf"; then
        flags+=(--build-arg TORCH_INDEX_URL=)
    fi
    [[ ${PAGEDGEN_IMAGE_NO_CACHE:-0} == 1 ]] && flags+=(--no-cache)
    local t0 build_s previous
    previous=$(buildah inspect --type image --format '{{.FromImageID}}' "$image" 2>/dev/null || true)
    t0=$(now)
    if ! buildah bud "${BUILDAH_FLAGS[@]}" "${flags[@]}" . >"$work/build.log" 2>&1; then
        grep -v "is ignored: it is neither" "$work/build.log" | tail -40 >&2
        echo "image-test: build failed (log: $work/build.log)" >&2
        exit 1
    fi
    build_s=$(since "$t0")
    # The image this build replaced (its layers stay as the build cache).
    if [[ -n $previous && $previous != $(buildah inspect --type image --format '{{.FromImageID}}' "$image") ]]; then
        buildah rmi "$previous" >/dev/null 2>&1 || true
    fi
    local size
    size=$(buildah images --json "$image" | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["size"])')
    echo "image-test: built $image in $build_s s, $size"
    [[ ${PAGEDGEN_IMAGE_BUILD_ONLY:-0} == 1 ]] && return

    # The container, its mounts, and the entrypoint the image declares.
    local ctr=pagedgen-image-test
    buildah rm "$ctr" >/dev/null 2>&1 || true
    buildah from --quiet --name "$ctr" "$image" >/dev/null
    trap 'buildah umount '"$ctr"' >/dev/null 2>&1 || true; buildah rm '"$ctr"' >/dev/null 2>&1 || true' EXIT
    rm -rf "$work/run" "$work/tmp" "$work/secrets"
    mkdir -p "$work/run" "$work/tmp" "$work/secrets"
    chown 10001:10001 "$work/run" && chmod 0770 "$work/run"
    chmod 1777 "$work/tmp"
    python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$work/secrets/api-key"
    chown 10001:10001 "$work/secrets/api-key" && chmod 0400 "$work/secrets/api-key"
    local entrypoint
    entrypoint=$(buildah inspect --type image "$image" |
                 python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"]["Entrypoint"]))')

    rm -f "$work/checks-passed"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$py" scripts/image_check.py \
        --container "$ctr" --entrypoint "$entrypoint" --work "$work" --build-s "$build_s" --image-size "$size"

    # A read-only root filesystem holds: the container's own layer has nothing but mount points.
    local upper written
    upper=$(dirname "$(buildah mount "$ctr")")/diff
    [[ -d $upper ]] || { echo "image-test: not the overlay storage driver: no $upper to check" >&2; exit 1; }
    written=$(cd "$upper" && find . -mindepth 1 ! -type d | head -20)
    buildah umount "$ctr" >/dev/null
    if [[ -n $written ]]; then
        echo "image-test: the server wrote to the image's root filesystem:" >&2
        echo "$written" >&2
        exit 1
    fi
    echo "image-test: nothing written outside /tmp and the mounted directories (read-only root holds)"
    echo "image-test: $(($(cat "$work/checks-passed") + 1)) passed, 0 failed"
}

case "${1:-}" in
    build) build_image ;;
    test) test_image ;;
    *) echo "usage: $0 build|test" >&2; exit 2 ;;
esac
