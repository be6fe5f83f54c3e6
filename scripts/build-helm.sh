#!/usr/bin/env bash
# Builds the helm binary the chart tests run (render, lint, install against
# the real kube-apiserver) from the Go module proxy, using the pinned module
# in test/helm, into a cache OUTSIDE the clone keyed by version:
#
#   ${SHUNT_CACHE:-/var/cache/shunt}/helm/<version>/helm
#
# An existing binary is not rebuilt. A cold build (empty Go build cache,
# modules downloaded) costs about 655 CPU-seconds: about 6 minutes on 2 quiet
# cores, 15 minutes measured while other builds loaded the machine.
#
# Usage: scripts/build-helm.sh              (build when absent)
#        scripts/build-helm.sh --print-path (prints the binary's path)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null || export PATH=$PATH:/usr/local/go/bin

mod=test/helm
version=$(sed -nE 's/^[[:space:]]*(require[[:space:]]+)?helm\.sh\/helm\/v4 (v[^[:space:]]+).*/\2/p' "$mod/go.mod")
[[ $version =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "build-helm: cannot parse helm.sh/helm/v4 version from $mod/go.mod" >&2; exit 1; }
dir=${SHUNT_CACHE:-/var/cache/shunt}/helm/$version

if [[ ${1:-} == --print-path ]]; then
	echo "$dir/helm"
	exit 0
fi
if [[ -x $dir/helm ]]; then
	echo "build-helm: helm $version present in $dir"
	exit 0
fi
mkdir -p "$dir"
echo "build-helm: building helm $version into $dir (cold: about 6 minutes on 2 cores)"
tmp=$(mktemp -d "$dir/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
# The version ldflags helm's own Makefile sets for a tagged release.
ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$version -X helm.sh/helm/v4/internal/version.metadata= -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
(cd "$mod" && CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -ldflags "$ldflags" -o "$tmp/helm" helm.sh/helm/v4/cmd/helm)
"$tmp/helm" version --short | grep -q "^$version" || { echo "build-helm: helm version does not report $version" >&2; exit 1; }
mv "$tmp/helm" "$dir/helm"
echo "build-helm: built helm $version in $((SECONDS - start))s"
