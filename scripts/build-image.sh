#!/usr/bin/env bash
# Builds shuntd's container image locally, without a registry or a container
# engine: static shuntd and shuntctl (version stamped into agent.Version) in
# /usr/local/bin/ of a one-layer OCI archive (test/ociimage/mkimage), named
# docker.io/shunt/shuntd:<version>, the chart's default image.repository and
# tag. Import it on a node with `ctr -n k8s.io images import ARCHIVE`.
#
# `make image` runs it; so does test/kubenode's DaemonSet test (two versions,
# for an upgrade).
#
# Usage: scripts/build-image.sh [-o ARCHIVE] [-v VERSION]
#   -o  archive to write (default bin/shuntd-image.tar)
#   -v  version and image tag (default: the chart's appVersion)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null || export PATH=$PATH:/usr/local/go/bin

out=bin/shuntd-image.tar
version=$(sed -nE 's/^appVersion: *"?([^"]*)"?/\1/p' deploy/helm/shunt/Chart.yaml)
while getopts o:v: opt; do
	case $opt in
	o) out=$OPTARG ;;
	v) version=$OPTARG ;;
	*) echo "usage: $0 [-o ARCHIVE] [-v VERSION]" >&2; exit 2 ;;
	esac
done
[[ $version =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || { echo "build-image: $version is not a valid image tag" >&2; exit 2; }
mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X github.com/shuntmesh/shunt/agent.Version=$version" -o "$tmp/" ./cmd/shuntd ./cmd/shuntctl
go run ./test/ociimage/mkimage -o "$out" -name "docker.io/shunt/shuntd:$version" \
	-entrypoint /usr/local/bin/shuntd \
	"$tmp/shuntd=/usr/local/bin/shuntd:0755" "$tmp/shuntctl=/usr/local/bin/shuntctl:0755"
