"""The accelerator catalog: ids, and the other spellings a run table or a user gives its parts."""

import pytest

from aiinfra.hardware import get_accelerator


@pytest.mark.parametrize(("name", "catalog_id"), [
    ("h100-sxm-80gb", "h100-sxm-80gb"), ("H100", "h100-sxm-80gb"), ("TPU v5p", "tpu-v5p"), ("v6e", "tpu-v6e"),
    ("Trillium", "tpu-v6e"), ("GB200-NVL72", "gb200"), ("MI300X", "mi300x"), ("a100_40gb", "a100-sxm-40gb"),
    # As published tables print them: vendor, system, memory type, SXM generation and TPU slice sizes around the part.
    ("NVIDIA H100 80GB HBM3", "h100-sxm-80gb"), ("H100 SXM5 80GB", "h100-sxm-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"), ("DGX B200", "b200"), ("B200 HGX", "b200"),
    ("AMD Instinct MI300X", "mi300x"), ("H200 SXM 141GB", "h200"), ("H800 SXM", "h800"), ("Google TPU v5p", "tpu-v5p"),
    ("v5p-1024", "tpu-v5p"), ("tpu-v5e-256", "tpu-v5e"), ("v5litepod-256", "tpu-v5e"), ("TPU v5 lite", "tpu-v5e"),
    ("v4-4096", "tpu-v4"),
])
def test_a_part_is_found_by_its_id_or_a_common_spelling(name: str, catalog_id: str) -> None:
    assert get_accelerator(name).id == catalog_id


def test_an_ambiguous_or_unknown_part_lists_the_ids() -> None:
    # The catalog holds A100s of 40 and 80 GB: "a100" alone is not guessed.
    # Other cards of a family (PCIe and NVL boards, export parts) are other parts, not their SXM sibling.
    for name in ("a100", "tpu-v9", "H100 PCIe", "H100 NVL", "H20", "A800"):
        with pytest.raises(KeyError, match=f"unknown hardware {name!r}; known: a100-sxm-40gb, a100-sxm-80gb"):
            get_accelerator(name)
