"""The ModelServer model, and the job's `serve.server` that names one."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.api import finetunejob as ftj
from kubetune.api import modelserver as ms

QWEN = {"id": "Qwen/Qwen2.5-0.5B-Instruct"}


def test_defaults_serve_on_one_gpu_with_four_adapter_slots_of_rank_16() -> None:
    spec = ms.ModelServerSpec.model_validate({"model": QWEN})
    assert (spec.engine, spec.resources.gpus, spec.replicas) == ("vllm", 1, 1)
    assert (spec.max_lora_rank, spec.max_loras) == (16, 4)
    assert ms.ModelServerSpec.model_validate(spec.to_wire()) == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "model"),
        ({"model": QWEN, "resources": {"gpus": 0}}, ms.GPUS_MESSAGE),
        ({"model": {**QWEN, "pvc": {"claimName": "m"}}}, "set exactly one of `id` or `pvc`"),
        ({"model": QWEN, "maxLoraRank": 1024}, "maxLoraRank"),
        ({"model": QWEN, "maxLoras": 0}, "maxLoras"),
        ({"model": QWEN, "enabled": True}, "enabled"),  # a job's field, not a server's
    ],
)
def test_each_bad_spec_names_its_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ms.ModelServerSpec.model_validate(spec)
    assert message in str(exc.value)


def test_a_job_served_by_a_model_server_needs_no_gpus_of_its_own() -> None:
    with pytest.raises(ValidationError, match=r"needs `serve\.resources\.gpus`"):
        ftj.ServeSpec.model_validate({"resources": {"gpus": 0}})
    shared = ftj.ServeSpec.model_validate({"server": "qwen", "resources": {"gpus": 0}})
    assert shared.server == "qwen"
    with pytest.raises(ValidationError, match="server"):
        ftj.ServeSpec.model_validate({"server": "Not_A_Name"})


def test_status_round_trips_through_wire_form() -> None:
    status = ms.ModelServerStatus.model_validate(
        {
            "adapters": ["alpha"],
            "refused": [{"name": "beta", "message": "trained on x"}],
            "baseURL": "http://qwen-server.team-a.svc:8000/v1",
        }
    )
    wire = status.to_wire()
    assert wire["baseURL"].endswith("/v1")
    assert ms.ModelServerStatus.model_validate(wire) == status


def test_an_openai_job_cannot_name_a_model_server() -> None:
    openai = {
        "provider": "openai",
        "dataset": {"url": "https://example.com/train.jsonl"},
        "openai": {"model": "gpt-4o-mini-2024-07-18", "apiKeySecretRef": {"name": "openai"}},
    }
    ftj.FineTuneJobSpec.model_validate(openai)
    with pytest.raises(ValidationError) as exc:
        ftj.FineTuneJobSpec.model_validate({**openai, "serve": {"server": "qwen"}})
    assert ftj.SERVE_SERVER_OPENAI_MESSAGE in str(exc.value)
