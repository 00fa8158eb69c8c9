from __future__ import annotations

import pytest

from kubetune.api.types import quantity_value


@pytest.mark.parametrize(
    ("quantity", "value"),
    [
        ("4", 4.0),
        ("500m", 0.5),
        ("16Gi", 16 * 2**30),
        ("1.5Gi", 1.5 * 2**30),
        ("64G", 64e9),
        ("512Mi", 512 * 2**20),
        ("2k", 2000.0),
        ("1Ti", 2.0**40),
    ],
)
def test_quantity_value_reads_every_suffix_of_the_quantity_pattern(
    quantity: str, value: float
) -> None:
    assert quantity_value(quantity) == value
