# kubetune: every install step lives here or in hack/. Caches (pip, the venv, Go modules and
# builds, Kubernetes binaries) live outside the clone, keyed by version: warm machines are fast,
# cold ones still work.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
export PYTHONSAFEPATH := 1

VENV := $(shell bash hack/venv.sh)
PY = $(VENV)/bin/python

.PHONY: help venv lock crds lint typecheck test test-unit test-cluster test-e2e test-pods k8s-bin images cluster-up cluster-down demo bench

help:
	@echo "make demo     - validate, train, serve and chat with the Daoist bot on the tiny model"
	@echo "make test     - every test tier (unit, cluster, e2e, pods), lint and types"
	@echo "make crds     - regenerate crds/ and the chart's CRD from kubetune/api"
	@echo "make lock     - renew the Python lock (hack/requirements/constraints.txt) after a pin changes"
	@echo "make cluster-up / cluster-down - the kwok test cluster (NODES=real: one real node)"
	@echo "make images   - the operator image (IMAGES=\"operator trainer server server-cpu\" for all)"

venv:
	@echo $(VENV)

lock:
	bash hack/requirements/lock.sh

crds:
	$(PY) -m kubetune.api.crd
	$(PY) -m kubetune.api.reference

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of symlinks that
# mirrors the installed layout (kubetune/ with operator/, trainer/, server/ inside).
typecheck:
	rm -rf build/typecheck && mkdir -p build/typecheck/kubetune
	for f in kubetune/*; do ln -s "$$PWD/$$f" build/typecheck/kubetune/; done
	for c in operator trainer server; do ln -s "$$PWD/$$c" build/typecheck/kubetune/$$c; done
	cd build/typecheck && $(VENV)/bin/mypy --config-file ../../pyproject.toml -p kubetune

test-unit:
	$(PY) -m pytest tests/unit -q

test-cluster: k8s-bin
	$(PY) -m pytest tests/cluster -q -m cluster

test-e2e:
	$(PY) -m pytest tests/e2e -q -m e2e

# kubetune's images as pods on a real node (kubelet + containerd, hack/node); needs root.
test-pods: k8s-bin
	$(PY) -m pytest tests/pods -q -m pods

test: lint typecheck test-unit test-cluster test-e2e test-pods

k8s-bin:
	bash hack/k8s/build.sh

# kubetune/<target>:dev from the Dockerfile, on a base made from Debian's packages (no registry
# needed); `make images IMAGES="operator trainer server server-cpu"` for all four (docs/images.md).
IMAGES ?= operator
images:
	bash hack/images/build.sh $(IMAGES)

NODES ?= kwok
cluster-up: k8s-bin
	KUBETUNE_CLUSTER_NODES=$(NODES) bash hack/cluster/cluster-up.sh

cluster-down:
	KUBETUNE_CLUSTER_NODES=$(NODES) bash hack/cluster/cluster-down.sh

demo:
	bash hack/demo.sh
