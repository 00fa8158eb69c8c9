"""kubetune.api: the canonical FineTuneJob model, the resolved trainer config, the CRD generator.

Imports only pydantic (and yaml for documents). Everything that describes a field lives here.
"""

from kubetune.api.finetunejob import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    FineTuneJobSpec,
    Method,
    Provider,
)
from kubetune.api.jobconfig import TrainerConfig
from kubetune.api.jobstatus import FineTuneJobStatus, Phase

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Method",
    "Phase",
    "Provider",
    "TrainerConfig",
]
