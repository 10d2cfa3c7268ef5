#!/usr/bin/env bash
# `make test-rdma`: pegaflow-rdma over real RDMA verbs (soft-RoCE, the kernel's rdma_rxe) inside a
# small Debian VM booted with qemu's software emulation, since neither CI nor the GPU machine has
# an RDMA NIC or rdma_rxe in its kernel. See docs/rdma.md ("Testing on soft-RoCE").
#
# Stages, each cached under $CACHE and keyed on its inputs, so a second run only rebuilds the
# project's own wheels and the disk image:
#   base   debootstrap of bookworm with rdma-core, python3-pyverbs, redis-server, pip
#                                                     (key: suite, packages, this stage)
#   deps   cp311 manylinux wheels of the project's dependencies, installed into a copy of base
#          with the VM's own pip run in a chroot      (key: base key, requirement list)
#   run    the project's wheels built here, installed (no network, no index) into a copy of deps;
#          the host kernel's rdma_rxe/veth/crc32 modules; an ext4 image of it; qemu boots the host's
#          kernel on it, init.sh runs the tests and prints result lines on
#          the serial console, which this script reads back.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
VM_DIR="$REPO/backends/rdma/vm"
CACHE=${PEGAFLOW_RDMA_VM_CACHE:-$REPO/.cache/rdma-vm}
SUITE=bookworm
PY_VERSION=3.11.2  # bookworm's python3: wheels' markers (e.g. redis needs async-timeout below 3.11.3) follow it
PACKAGES=rdma-core,ibverbs-providers,ibverbs-utils,python3-pyverbs,python3-pip,kmod,iproute2,redis-server,procps
# rdma_rxe computes its ICRC with the kernel's crc32 (crypto-crc32, a module in Debian's kernel)
MODULES=(udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe veth crc32_generic)
VM_TIMEOUT=${PEGAFLOW_RDMA_VM_TIMEOUT:-1500}
# PEGAFLOW_RDMA_TESTS=rdma/test_contract.py,rdma/test_verbs.py::test_x narrows the run in the VM;
# PEGAFLOW_RDMA_BENCH=1 adds `pegaflow bench remote` over rdma and loopback (figures under emulation).
# Builds the project's wheels: needs setuptools and grpcio-tools, which the repo's .venv (make setup) has.
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=python3
  [[ -x $REPO/.venv/bin/python ]] && PYTHON=$REPO/.venv/bin/python
fi
# The dependencies of every wheel we install in the VM (pegaflow-core, -dram, -redis, -rdma,
# -conformance) and of the tests (pytest, hypothesis). async-timeout: redis needs it below Python 3.11.3
# (bookworm has 3.11.2), and pip download does not evaluate that marker for the target version.
REQUIREMENTS=(grpcio protobuf pluggy PyYAML numpy xxhash prometheus_client redis async-timeout pytest pytest-timeout hypothesis)

log() { printf '[test-rdma %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
key() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }

[[ $(id -u) == 0 ]] || die "needs root (debootstrap, chroot, mkfs.ext4 -d of a root-owned tree)"

host_tools() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  compgen -G "/boot/vmlinuz-*-amd64" >/dev/null || missing+=(linux-image-amd64)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
  fi
  KERNEL=$(basename "$(ls /boot/vmlinuz-*-amd64 | sort -V | tail -1)")
  KVER=${KERNEL#vmlinuz-}
  [[ -f /boot/initrd.img-$KVER ]] || die "/boot/initrd.img-$KVER is missing (reinstall linux-image-$KVER)"
  [[ -d /lib/modules/$KVER ]] || die "/lib/modules/$KVER is missing"
  MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
}

stage_base() {
  BASE_KEY=$(key base-v1 "$SUITE" "$PACKAGES")
  BASE="$CACHE/base-$BASE_KEY"
  [[ -d $BASE ]] && { log "base root file system: cached ($BASE)"; return; }
  log "base root file system: debootstrap $SUITE (about 2-4 minutes)"
  local tmp="$BASE.tmp"
  rm -rf "$tmp"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $CACHE/debootstrap.log"
  rm -rf "$tmp/var/cache/apt/archives"/*.deb
  mv "$tmp" "$BASE"
}

in_chroot() {  # in_chroot ROOT CMD...: run with /proc and /dev available, unmounted after
  local root=$1; shift
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  local rc=0
  # a clean environment: the host's PIP_* settings and paths mean nothing inside
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    chroot "$root" "$@" || rc=$?
  umount "$root/dev" "$root/proc"
  return $rc
}

stage_deps() {
  DEPS_KEY=$(key deps-v1 "$BASE_KEY" "$PY_VERSION" "${REQUIREMENTS[@]}")
  DEPS="$CACHE/deps-$DEPS_KEY"
  [[ -d $DEPS ]] && { log "dependencies: cached ($DEPS)"; return; }
  local wheels="$CACHE/wheels-$DEPS_KEY"
  if [[ ! -d $wheels ]]; then
    log "dependencies: pip download of cp311 manylinux wheels"
    "$PYTHON" -m pip download -q --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --python-version "$PY_VERSION" --implementation cp --abi cp311 --abi abi3 --abi none \
      -d "$wheels.tmp" "${REQUIREMENTS[@]}" >&2 || die "pip download of ${REQUIREMENTS[*]} failed"
    mv "$wheels.tmp" "$wheels"
  fi
  log "dependencies: installing them into a copy of the base (chroot, the VM's own pip)"
  rm -rf "$DEPS.tmp"
  cp -a "$BASE" "$DEPS.tmp"
  mkdir -p "$DEPS.tmp/tmp/wheels"
  cp "$wheels"/*.whl "$DEPS.tmp/tmp/wheels/"
  in_chroot "$DEPS.tmp" python3 -m pip install -q --no-index --find-links /tmp/wheels --break-system-packages \
    --no-warn-script-location "${REQUIREMENTS[@]}" >&2 || die "pip install in the chroot failed"
  rm -rf "$DEPS.tmp/tmp/wheels" "$DEPS.tmp/root/.cache"
  mv "$DEPS.tmp" "$DEPS"
}

stage_run() {
  RUN="$CACHE/run"
  rm -rf "$RUN"
  mkdir -p "$RUN/dist"
  log "project: building wheels"
  # --no-build-isolation: the repo's venv (or this python) has setuptools and grpcio-tools. Stale
  # build/ folders would put files deleted from the tree into the wheels.
  rm -rf "$REPO/build" "$REPO"/backends/{dram,redis,rdma}/build "$REPO/conformance/build"
  "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$RUN/dist" \
    "$REPO" "$REPO/backends/dram" "$REPO/backends/redis" "$REPO/backends/rdma" "$REPO/conformance" >&2 \
    || die "building the project's wheels failed"
  log "project: installing the wheels into a copy of the dependencies stage"
  cp -a "$DEPS" "$RUN/rootfs"
  local root="$RUN/rootfs"
  mkdir -p "$root/tmp/dist"
  cp "$RUN"/dist/*.whl "$root/tmp/dist/"
  in_chroot "$root" sh -c 'python3 -m pip install -q --no-index --no-deps --break-system-packages \
    --no-warn-script-location /tmp/dist/*.whl' >&2 || die "pip install of the project in the chroot failed"
  rm -rf "$root/tmp/dist"
  mkdir -p "$root/pegaflow-tests"
  cp -r "$REPO/backends/rdma/tests" "$root/pegaflow-tests/rdma"
  find "$root/pegaflow-tests" -name __pycache__ -prune -exec rm -rf {} +
  install -m 755 "$VM_DIR/init.sh" "$root/sbin/pegaflow-init"
  log "project: the host kernel's modules the VM needs (${MODULES[*]})"
  local name path
  for name in "${MODULES[@]}"; do
    path=$(modinfo -k "$KVER" -n "$name") || die "kernel $KVER has no module $name"
    mkdir -p "$root/usr/lib/modules/$KVER/$(dirname "${path#/lib/modules/$KVER/}")"
    cp "$path" "$root/usr/lib/modules/$KVER/${path#/lib/modules/$KVER/}"
  done
  cp /lib/modules/"$KVER"/modules.{order,builtin,builtin.modinfo} "$root/usr/lib/modules/$KVER/" 2>/dev/null || true
  depmod -b "$root" "$KVER"
  log "project: disk image"
  truncate -s 3G "$RUN/vm.img"
  mkfs.ext4 -q -F -d "$root" "$RUN/vm.img"
  rm -rf "$root"
}

boot() {
  log "booting the VM (qemu TCG, -smp 2; the serial console follows, result lines start with PEGAFLOW-RDMA)"
  local rc=0
  timeout --foreground "$VM_TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 3072 -smp 2 -nographic -no-reboot \
    -kernel "/boot/$KERNEL" -initrd "/boot/initrd.img-$KVER" \
    -drive "file=$RUN/vm.img,format=raw,if=virtio" \
    -append "root=/dev/vda rw console=ttyS0 init=/sbin/pegaflow-init panic=-1 edd=off quiet ${PEGAFLOW_RDMA_TESTS:+pegaflow_tests=$PEGAFLOW_RDMA_TESTS} ${PEGAFLOW_RDMA_BENCH:+pegaflow_bench=1}" \
    </dev/null | tee "$RUN/serial.log" || rc=$?
  ((rc != 124)) || die "the VM did not power off within ${VM_TIMEOUT}s (PEGAFLOW_RDMA_VM_TIMEOUT); see $RUN/serial.log"
  grep -a '^PEGAFLOW-RDMA' "$RUN/serial.log" | tr -d '\r' > "$RUN/results.txt" || true
  echo
  log "result lines from the VM:"
  cat "$RUN/results.txt" >&2
  grep -q '^PEGAFLOW-RDMA-EXIT 0$' "$RUN/results.txt" || die "the tests in the VM did not pass (see $RUN/serial.log)"
  log "passed"
}

main() {
  host_tools
  stage_base
  stage_deps
  [[ ${1:-} == --prepare ]] && return 0  # the cached stages only (e.g. to time them)
  stage_run
  boot
}

main "$@"; exit $?  # one line: bash has read all of it before it runs, so editing this file mid-run is safe
