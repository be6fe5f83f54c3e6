#!/usr/bin/env bash
# Installs what Shunt's build, demo and tests need on a fresh Debian 12 machine
# (root). Idempotent: packages already present are not fetched again.
set -euo pipefail
# containerd, runc and containernetworking-plugins run the real node of
# test/kubenode (its own private config and socket; the packages' service is
# never started by the tests); ctr imports the images test/ociimage writes.
# prometheus: prometheus and promtool for the alert rules' and dashboard's
# tests (test/ops, test/e2e TestObservability run their own server).
pkgs=(clang-19 llvm-19 libbpf-dev linux-libc-dev iproute2 iptables haproxy iperf3 util-linux curl ethtool etcd-server
	containerd runc containernetworking-plugins prometheus)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	# The tests start their own Prometheus on loopback; the service the
	# package enables would listen on every interface: stop it.
	if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null && systemctl is-active -q prometheus 2>/dev/null; then
		systemctl disable --now prometheus
	fi
fi
command -v go >/dev/null || export PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "Go toolchain not found (expected /usr/local/go)" >&2; exit 1; }
# bpffs for pins.
if ! mountpoint -q /sys/fs/bpf; then
	mount -t bpf bpf /sys/fs/bpf
fi
