#!/usr/bin/env bash
# Builds the real Kubernetes control plane binaries the integration tests run
# (kube-apiserver, optionally kubelet and kube-controller-manager) from the Go
# module proxy, using the
# pinned module in test/k8s, into a cache OUTSIDE the clone keyed by version:
#
#   ${SHUNT_CACHE:-/var/cache/shunt}/k8s/<version>/{kube-apiserver,kubelet,kube-controller-manager,etcd,kubectl}
#
# etcd is a symlink to the Debian etcd-server package's etcd (and kubectl to
# the machine's, if any), so the directory is a complete KUBEBUILDER_ASSETS for
# sigs.k8s.io/controller-runtime/pkg/envtest. Binaries that already exist are
# not rebuilt (a cold kube-apiserver build takes about 11 minutes on 2 cores,
# the kubelet about 5 more).
#
# Usage: scripts/build-k8s.sh [kube-apiserver] [kubelet] [kube-controller-manager]
#                                                           (default: kube-apiserver)
#        scripts/build-k8s.sh --print-dir                   (prints the cache dir)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null || export PATH=$PATH:/usr/local/go/bin

mod=test/k8s
version=$(sed -nE 's/^[[:space:]]*(require[[:space:]]+)?k8s\.io\/kubernetes (v[^[:space:]]+).*/\2/p' "$mod/go.mod")
[[ $version =~ ^v([0-9]+)\.([0-9]+)\.([0-9]+)$ ]] || { echo "build-k8s: cannot parse k8s.io/kubernetes version from $mod/go.mod" >&2; exit 1; }
major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
dir=${SHUNT_CACHE:-/var/cache/shunt}/k8s/$version

if [[ ${1:-} == --print-dir ]]; then
	echo "$dir"
	exit 0
fi

targets=("$@")
((${#targets[@]})) || targets=(kube-apiserver)
mkdir -p "$dir"

# The tests (test/kube) and envtest want etcd next to kube-apiserver;
# envtest also kubectl, linked when the machine has one.
if [[ ! -e $dir/etcd ]]; then
	p=$(command -v etcd || true)
	[[ -n $p ]] || { echo "build-k8s: etcd not found on PATH (scripts/install-deps.sh installs etcd-server)" >&2; exit 1; }
	ln -sf "$p" "$dir/etcd"
fi
if [[ ! -e $dir/kubectl ]] && p=$(command -v kubectl); then
	ln -sf "$p" "$dir/kubectl"
fi

# Version ldflags, as hack/lib/version.sh sets them, so /version parses.
# SOURCE_DATE_EPOCH keeps builds reproducible.
ldflags=""
for kv in "gitVersion=$version" "gitMajor=$major" "gitMinor=$minor" \
	"gitCommit=0000000000000000000000000000000000000000" "gitTreeState=clean" \
	"buildDate=1970-01-01T00:00:00Z"; do
	ldflags+=" -X 'k8s.io/client-go/pkg/version.$kv' -X 'k8s.io/component-base/version.$kv'"
done

pkgs=()
for t in "${targets[@]}"; do
	case $t in
	kube-apiserver | kubelet | kube-controller-manager | kube-scheduler) ;;
	*) echo "build-k8s: unknown target $t" >&2; exit 2 ;;
	esac
	[[ -x $dir/$t ]] && continue
	pkgs+=("k8s.io/kubernetes/cmd/$t")
done
if ((${#pkgs[@]} == 0)); then
	echo "build-k8s: $version binaries present in $dir"
	exit 0
fi

echo "build-k8s: building ${pkgs[*]} $version into $dir (cold on 2 cores: kube-apiserver about 11 minutes, the kubelet about 5 more)"
tmp=$(mktemp -d "$dir/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
(cd "$mod" && CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -ldflags "-s -w $ldflags" -o "$tmp/" "${pkgs[@]}")
for p in "${pkgs[@]}"; do
	b=${p##*/}
	"$tmp/$b" --version | grep -q "Kubernetes $version" || { echo "build-k8s: $b --version does not report $version" >&2; exit 1; }
	mv "$tmp/$b" "$dir/$b"
done
echo "build-k8s: built ${pkgs[*]} in $((SECONDS - start))s"
