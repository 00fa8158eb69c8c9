"""Fixtures for tests that need the real control plane (see tests/support/cluster.py).

``cluster`` (session): a :class:`support.cluster.Cluster` with ``kubeconfig``, ``bin_dir``,
``kubectl_bin``, ``helm_bin``, ``kubectl(*args, input=None)``, ``apply``, ``get`` and ``env()``.
A fresh kwokctl cluster is made for the session and deleted after it, unless
``KUBETUNE_TEST_KUBECONFIG`` names an existing cluster to use instead.
``namespace`` (function): a fresh namespace in that cluster, deleted after the test.
``operator`` (module): the real operator process, watching all namespaces, with the CRD installed.
``team`` (function): ``namespace`` with the output claim and the dataset ConfigMap a local job
uses. A test module may override either (and build on the original by naming it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `support` lives in tests/; the repository root cannot go on sys.path (its operator/ folder
# would shadow the standard library), so tests/ itself does.
_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from support import cluster as kcluster  # noqa: E402
from support import ftj  # noqa: E402
from support.operator import OperatorProcess, running_operator  # noqa: E402


@pytest.fixture(scope="session")
def cluster() -> Iterator[kcluster.Cluster]:
    with kcluster.session_cluster() as c:
        yield c


@pytest.fixture
def namespace(cluster: kcluster.Cluster) -> Iterator[str]:
    name = cluster.create_namespace("kt-test-")
    yield name
    # Not waited for: namespace deletion finishes in the background; nothing reuses the name.
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(
    cluster: kcluster.Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    ftj.install_crd(cluster)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with running_operator(cluster.kubeconfig, log) as op:
        yield op


@pytest.fixture
def team(cluster: kcluster.Cluster, namespace: str) -> str:
    ftj.output_volume(cluster, namespace)
    ftj.dataset_configmap(cluster, namespace, ftj.dataset_text())
    return namespace
