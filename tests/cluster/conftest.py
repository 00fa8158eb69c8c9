"""Fixtures for tests that need the real control plane (see tests/support/cluster.py).

``cluster`` (session): a :class:`support.cluster.Cluster` with ``kubeconfig``, ``bin_dir``,
``kubectl_bin``, ``helm_bin``, ``kubectl(*args, input=None)``, ``apply``, ``get`` and ``env()``.
A fresh kwokctl cluster is made for the session and deleted after it, unless
``KUBETUNE_TEST_KUBECONFIG`` names an existing cluster to use instead.
``namespace`` (function): a fresh namespace in that cluster, deleted after the test.
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
