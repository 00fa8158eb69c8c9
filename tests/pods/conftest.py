"""Fixtures for the pods tier: a cluster whose one node really runs pods.

- ``cluster`` (session): the control plane of tests/cluster plus a real node, a kubelet and
  containerd with Debian's runc and CNI plugins, and kube-proxy (``hack/node``). Needs root.
  ``KUBETUNE_TEST_REAL_KUBECONFIG`` runs against such a cluster made elsewhere.
- ``images`` (session): the operator, trainer and server-cpu images built from this checkout
  (``hack/images``), by target, as references in the node's registry (``push-images.sh``).
- ``demo_model`` (tests/conftest.py): the tiny Llama of the demo job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from support import cluster as kcluster  # noqa: E402
from support import images as kimages  # noqa: E402

IMAGE_TARGETS = ("operator", "trainer", "server-cpu")


@pytest.fixture(scope="session")
def cluster() -> Iterator[kcluster.Cluster]:
    if os.geteuid() != 0 and not os.environ.get(kcluster.ENV_REAL_KUBECONFIG):
        pytest.skip("the pods tier runs a kubelet and containerd, which need root")
    with kcluster.session_cluster("real") as c:
        yield c


@pytest.fixture(scope="session")
def images(cluster: kcluster.Cluster) -> dict[str, str]:
    built = [kimages.build(target) for target in IMAGE_TARGETS]
    return dict(zip(IMAGE_TARGETS, cluster.push_images(*built), strict=True))
