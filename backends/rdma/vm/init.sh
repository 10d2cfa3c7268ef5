#!/bin/sh
# PID 1 of the soft-RoCE test VM (see test-rdma.sh): bring up two rxe devices on a veth pair, run
# the RDMA tests over them, print result lines on the serial console, power off.
# Every line the host reads back starts with PEGAFLOW-RDMA; the last one is PEGAFLOW-RDMA-EXIT <rc>.
# The kernel hands unknown `key=value` boot parameters to init as environment variables:
# pegaflow_tests=<comma-separated pytest selections> narrows the run (default: every test);
# pegaflow_bench=1 also runs `pegaflow bench remote` over rdma and over loopback.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

say() { echo "PEGAFLOW-RDMA $*"; }
echo  # the firmware leaves escape codes on the current console line
finish() {
  echo "PEGAFLOW-RDMA-EXIT $1"
  sync
  echo o > /proc/sysrq-trigger
  sleep 30
}

started=$(date +%s)
hostname pegaflow-vm
ip link set lo up
for module in veth crc32_generic ib_uverbs rdma_rxe; do
  modprobe "$module" || { say "modprobe $module failed"; finish 10; }
done
# Two "hosts" on one veth pair, each with its own soft-RoCE device (rxe0 on 10.77.0.1, rxe1 on
# 10.77.0.2). An endpoint uses both NICs; queue pairs pair NIC i with the peer's NIC i.
ip link add veth0 type veth peer name veth1
ip addr add 10.77.0.1/24 dev veth0
ip addr add 10.77.0.2/24 dev veth1
ip link set veth0 up
ip link set veth1 up
rdma link add rxe0 type rxe netdev veth0 || { say "rdma link add rxe0 failed"; finish 11; }
rdma link add rxe1 type rxe netdev veth1 || { say "rdma link add rxe1 failed"; finish 11; }
sleep 1
rdma link show | while read -r line; do say "link: $line"; done
ulimit -l unlimited
say "kernel $(uname -r), $(python3 --version), pyverbs from $(dpkg-query -W -f='${Version}' python3-pyverbs)"
say "backends: $(pegaflow backends | grep -E '^transport +rdma')"

export PEGAFLOW_RDMA_DEVICES=rxe0,rxe1 PEGAFLOW_RDMA_HOST=10.77.0.1 PEGAFLOW_RDMA_PEER_HOST=10.77.0.2
export PEGAFLOW_RDMA_REQUIRE=1
cd /pegaflow-tests
selection=$(echo "${pegaflow_tests:-rdma}" | tr ',' ' ')
# shellcheck disable=SC2086
python3 -m pytest -p no:cacheprovider -rA -q --timeout 600 $selection 2>&1 | tee /tmp/pytest.log
rc=$(grep -q . /tmp/pytest.log && python3 - <<'EOF'
import re
text = open("/tmp/pytest.log").read()
last = text.strip().splitlines()[-1]
print(0 if re.search(r"\d+ passed", last) and not re.search(r"failed|error", last) else 1)
EOF
)
grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL)|[0-9]+ (passed|failed)' /tmp/pytest.log | while read -r line; do say "$line"; done
if [ -n "${pegaflow_bench:-}" ]; then  # figures under emulation: ratios only, never speeds
  for kind in rdma loopback; do
    pegaflow bench remote --transport "$kind" --blocks 16 --rounds 3 2>&1 | while read -r line; do say "bench $kind: $line"; done
  done
fi
if [ "${rc:-1}" != 0 ]; then
  dmesg | tail -n 30 | while read -r line; do say "dmesg: $line"; done
  rdma res show qp | head -n 20 | while read -r line; do say "qp: $line"; done
fi
say "tests took $(( $(date +%s) - started )) s in the VM"
finish "${rc:-1}"
