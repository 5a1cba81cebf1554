#!/usr/bin/env bash
# Build docker/Dockerfile with podman on a host that cannot pull base images, then smoke-test it.
#   docker/build-local.sh            # bootstrap the base if absent, build, run the two smoke commands
#   SKIP_SMOKE=1 docker/build-local.sh
# 1. Base: a Debian bookworm rootfs made with mmdebstrap from the Debian mirror (cached as a tarball)
#    and imported as a local image; the Dockerfile installs python3 (3.11) into it.
# 2. Build: pip inside the build reads this host's pip configuration and local wheel folders, which
#    are bind-mounted for the build only (nothing of them ends up in the image or the Dockerfile).
# 3. Smoke: `python -c "import pipeline"` and `dvc stage list` in /workspace of the image.
# Needs root (or rootless podman set up), podman and mmdebstrap: apt-get install podman mmdebstrap
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/dssn-pipeline:local}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-bookworm-rootfs:latest}
CACHE=${DSSN_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dssn-docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# Sandboxed hosts: crun 1.8 (Debian 12) refuses hybrid cgroup v1/v2 hosts ("cgroups in hybrid mode
# not supported"), so runc is used when installed; and without CAP_SYS_RESOURCE podman's default
# rlimits (nofile 1048576, nproc 4194304) cannot be set, so the containers get lower ones.
PODMAN=(podman)
OCI_RUNTIME=${OCI_RUNTIME-$(command -v runc >/dev/null && echo runc)}
if [[ -n $OCI_RUNTIME ]]; then PODMAN+=(--runtime "$OCI_RUNTIME"); fi
LIMITS=(--ulimit "nofile=${NOFILE:-16384}:${NOFILE:-16384}" --ulimit "nproc=${NPROC:-16384}:${NPROC:-16384}")

# --- 1. base image -------------------------------------------------------------------------------
if ! podman image exists "$BASE_IMAGE"; then
    rootfs=$CACHE/bookworm-rootfs.tar
    if [[ ! -s $rootfs ]]; then
        mkdir -p "$CACHE"
        echo "bootstrapping Debian bookworm (minbase) into $rootfs"
        mmdebstrap --variant=minbase --mode=auto --format=tar bookworm "$rootfs.part" \
            "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
            "deb $SECURITY_MIRROR bookworm-security main"
        mv "$rootfs.part" "$rootfs"
    fi
    podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' "$rootfs" "$BASE_IMAGE"
fi

# --- 2. build --------------------------------------------------------------------------------------
# The host's pip settings: /etc/xdg/pip/pip.conf (find-links, extra local indexes, constraints) and
# /etc/pip.conf, whose `cert` names the host's CA bundle (it trusts the egress proxy in front of
# PyPI). The image has its own bundle at that path, so the host's is mounted beside it and a
# generated /etc/pip.conf points pip at it.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mounts=()
for path in /opt/wheels /opt/pypi /opt/pypi-more /etc/xdg/pip; do
    if [[ -e $path ]]; then mounts+=(-v "$path:$path:ro"); fi
done
: >"$tmp/pip.conf"
host_ca=/etc/ssl/certs/ca-certificates.crt
if [[ -s $host_ca ]]; then
    printf '[global]\ncert = /run/host-ca-certificates.crt\n' >"$tmp/pip.conf"
    mounts+=(-v "$host_ca:/run/host-ca-certificates.crt:ro")
fi
mounts+=(-v "$tmp/pip.conf:/etc/pip.conf:ro")

start=$(date +%s)
# --format docker: the OCI format has no SHELL instruction (podman would ignore it, and pipefail)
"${PODMAN[@]}" build --format docker --network=host "${LIMITS[@]}" "${mounts[@]}" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" -f docker/Dockerfile -t "$IMAGE" .
echo "build took $(($(date +%s) - start)) s"
podman image ls --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' "$IMAGE"

# --- 3. smoke --------------------------------------------------------------------------------------
if [[ -z ${SKIP_SMOKE:-} ]]; then
    set -x
    "${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" "$IMAGE" python -c "import pipeline; print(pipeline.__file__)"
    "${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" "$IMAGE" dvc stage list
fi
