"""Pure builders for a ModelServer's objects: one vLLM for a base model, many jobs' adapters.

``model_server_objects(...)``, given the mounts and config of ``model_server_layout(...)``,
returns the same three objects as a job's own server
(:mod:`kubetune.operator.serving_manifests`, whose builders it uses): the serve config
ConfigMap, the Deployment and the Service, with the labels ``kubetune.io/modelserver`` and
component ``modelserver`` (so a FineTuneJob's server index never picks them up).

Each job's output folder is mounted read-only (a ``subPath``) at ``/kubetune/adapters/<job>``.
With ``adapterUpdates: Live`` the pods instead mount the namespace's folder of each output
claim (:func:`folder_mount`), run the adapter-sync sidecar, and their template leaves the
adapter list out: a new adapter set changes the ConfigMap alone.

Nothing here talks to Kubernetes; ``tests/unit/operator/test_model_server`` checks the output.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kubetune.api import modelserver as ms
from kubetune.api.serveconfig import ServeConfig
from kubetune.operator import manifests
from kubetune.operator import serving_manifests as sm
from kubetune.operator.serving_manifests import AdapterMount
from kubetune.operator.settings import OperatorSettings


def shared_serve_config(*, spec: ms.ModelServerSpec, paths: dict[str, str]) -> ServeConfig:
    """A ModelServer: its base model and each job's adapter (in-pod folders by job name,
    sorted); with ``adapterUpdates: Live``, runtime loading on for the sidecar."""
    return sm.launcher_config(
        serve=spec,
        base_model=spec.model,
        adapters={name: paths[name] for name in sorted(paths)},
        max_lora_rank=spec.max_lora_rank,
        max_loras=spec.max_loras,
        adapter_sync=spec.live,
    )


def folder_mount(adapter: AdapterMount) -> tuple[AdapterMount, str]:
    """For a server that loads adapters at run time: the folder that holds the job's output
    folder (``[<output path>/]<namespace>`` of the claim), mounted at a path named by a hash of
    claim and folder, and the adapter's path under it. A job that succeeds later on the same
    claim appears in the running pods without a new mount (a new mount would roll them)."""
    parent, leaf = adapter.subpath.rsplit("/", 1)
    key = hashlib.sha256(f"{adapter.claim}/{parent}".encode()).hexdigest()[:10]
    mount = AdapterMount(claim=adapter.claim, subpath=parent, path=f"{sm.ADAPTERS_DIR}/{key}")
    return mount, f"{mount.path}/{leaf}"


def model_server_layout(
    spec: ms.ModelServerSpec, adapters: dict[str, AdapterMount]
) -> tuple[list[AdapterMount], ServeConfig]:
    """A ModelServer's mounts and launcher config for ``adapters`` (by job name): each job's
    folder, or with ``adapterUpdates: Live`` each output claim's namespace folder (see
    :func:`folder_mount`)."""
    names = sorted(adapters)
    if spec.live:
        folders = {name: folder_mount(adapters[name]) for name in names}
        mounts = list(dict.fromkeys(mount for mount, _ in folders.values()))
        paths = {name: path for name, (_, path) in folders.items()}
    else:
        mounts = [adapters[name] for name in names]
        paths = {name: adapters[name].path for name in names}
    return mounts, shared_serve_config(spec=spec, paths=paths)


def model_server_objects(
    *,
    owner: manifests.Owner,
    spec: ms.ModelServerSpec,
    mounts: list[AdapterMount],
    config: ServeConfig,
    settings: OperatorSettings,
) -> list[dict[str, Any]]:
    """A ModelServer's ConfigMap, Deployment and Service for the ``mounts`` and ``config`` of
    :func:`model_server_layout` (the caller keeps the config: its digest and served name).

    With ``adapterUpdates: Live`` the pods run the adapter-sync sidecar, and their template
    does not change with the adapter set: a new set changes the ConfigMap alone, which the
    kubelet updates in the running pods, where the sidecar loads it."""
    return [
        sm.config_configmap(config, owner),
        sm.deployment(
            owner=owner,
            serve=spec,
            base_model=spec.model,
            adapters=mounts,
            config=config,
            settings=settings,
            queue=spec.queue,
            adapter_sync=spec.live,
        ),
        sm.service(owner),
    ]
