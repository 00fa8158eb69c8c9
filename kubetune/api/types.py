"""Building blocks shared by every API document: the camelCase base model and small field types.

Everything the API server, the operator, the trainer and the server exchange is declared with
these, so the wire format (camelCase, int-or-"auto", quantities) is decided in one place.
This module imports only pydantic.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

AUTO = "auto"


class ApiModel(BaseModel):
    """Base of every API document: snake_case in Python, camelCase on the wire, no extras.

    Unknown fields are errors (a typo in a manifest must not be silently ignored); the
    API server prunes them too, this catches them in files and ConfigMaps.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_enum_values=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase, JSON-ready form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _int_or_auto_schema(minimum: int, maximum: int) -> dict[str, Any]:
    rule = f"type(self) == int ? (self >= {minimum} && self <= {maximum}) : self == 'auto'"
    return {
        "x-kubernetes-int-or-string": True,
        "x-kubernetes-validations": [
            {"rule": rule, "message": f'must be "auto" or an integer in {minimum}..{maximum}'}
        ],
    }


def int_or_auto(minimum: int, maximum: int) -> Any:
    """An integer within bounds, or the string "auto" (OpenAI's convention)."""
    return Annotated[
        int | Literal["auto"],
        Field(union_mode="left_to_right"),
        WithJsonSchema(_int_or_auto_schema(minimum, maximum)),
    ]


EpochsOrAuto = int_or_auto(1, 50)
BatchSizeOrAuto = int_or_auto(1, 256)

# Float-or-"auto" has no structural-schema type; it travels as a string like "0.5" or "auto".
FloatOrAuto = Annotated[
    str,
    Field(pattern=r"^(auto|[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?)$", max_length=32),
]

Quantity = Annotated[
    str,
    Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$", max_length=32),
]
"""A Kubernetes resource quantity such as ``4``, ``500m`` or ``16Gi``."""

_QUANTITY_UNITS = {
    "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip


def quantity_value(quantity: str) -> float:
    """The number a :data:`Quantity` stands for (bytes, for memory): ``16Gi`` -> 17179869184."""
    number = quantity.rstrip("mkKMGTi")
    return float(number) * _QUANTITY_UNITS.get(quantity[len(number) :], 1)


DNSName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
"""A DNS-1123 label: the names of ConfigMaps, Secrets, PVCs and LocalQueues."""

ConfigKey = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]
"""A key in a ConfigMap or Secret."""
