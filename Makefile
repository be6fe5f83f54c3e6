GO ?= go
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build deps generate check test demo bench bench-sidecar image clean

all: build

build:
	$(GO) build -o bin/ ./cmd/...

# Also builds the real Kubernetes binaries the tests run (kube-apiserver; the
# kubelet of test/kubenode's real node, and kube-controller-manager and
# kube-scheduler for its DaemonSet) and helm for the chart's tests,
# from the Go module proxy, cached outside the clone; skipped when present.
deps:
	./scripts/install-deps.sh
	./scripts/build-k8s.sh kube-apiserver kubelet kube-controller-manager kube-scheduler
	./scripts/build-helm.sh

# Regenerate the bpf2go bindings and objects (needs clang-19, llvm-strip-19).
generate:
	$(GO) generate ./bpf/...

# CI gates: formatting, vet, generated files in sync with the C sources.
check: deps
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	$(GO) generate ./bpf/...
	@git diff --exit-code -- bpf || { echo "bpf: generated files differ from the committed ones: run make generate and commit"; exit 1; }

# The whole test suite. Privileged tests run as root and fail (never skip)
# when a kernel feature is missing.
test: deps
	$(GO) test -count=1 -timeout 30m ./...

# Standalone demo: pods as netns + cgroups, shuntd with a service, traffic.
demo: deps build
	./bin/shuntctl demo

bench: deps build
	./bin/shuntctl bench connect

# Sidecar chain: direct vs iptables REDIRECT vs Shunt steering + sockmap off/auto/on.
bench-sidecar: deps build
	./bin/shuntctl bench sidecar

# shuntd's container image, built locally without a registry or engine: a
# one-layer OCI archive of static shuntd and shuntctl, named as the chart's
# default image (scripts/build-image.sh; test/kubenode's DaemonSet test builds
# it the same way). Import it on a node: ctr -n k8s.io images import bin/shuntd-image.tar
VERSION ?= $(shell sed -nE 's/^appVersion: *"?([^"]*)"?/\1/p' deploy/helm/shunt/Chart.yaml)
image:
	./scripts/build-image.sh -o bin/shuntd-image.tar -v $(VERSION)

clean:
	rm -rf bin
