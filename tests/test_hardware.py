"""The accelerator catalog: ids, and the other spellings a run table or a user gives its parts."""

import pytest

from aiinfra.hardware import get_accelerator


@pytest.mark.parametrize(("name", "catalog_id"), [
    ("h100-sxm-80gb", "h100-sxm-80gb"), ("H100", "h100-sxm-80gb"), ("TPU v5p", "tpu-v5p"), ("v6e", "tpu-v6e"),
    ("Trillium", "tpu-v6e"), ("GB200-NVL72", "gb200"), ("MI300X", "mi300x"), ("a100_40gb", "a100-sxm-40gb"),
])
def test_a_part_is_found_by_its_id_or_a_common_spelling(name: str, catalog_id: str) -> None:
    assert get_accelerator(name).id == catalog_id


def test_an_ambiguous_or_unknown_part_lists_the_ids() -> None:
    # The catalog holds A100s of 40 and 80 GB: "a100" alone is not guessed.
    for name in ("a100", "tpu-v9"):
        with pytest.raises(KeyError, match=f"unknown hardware {name!r}; known: a100-sxm-40gb, a100-sxm-80gb"):
            get_accelerator(name)
