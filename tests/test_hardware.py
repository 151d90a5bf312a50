"""The accelerator catalog: ids, and the other spellings a run table or a user gives its parts."""

import csv

import pytest

from aiinfra.hardware import CATALOG_CSV, get_accelerator, load_catalog, match_device_name
from aiinfra.plan.efficiency import efficiency_table


@pytest.mark.parametrize(("name", "catalog_id"), [
    ("h100-sxm-80gb", "h100-sxm-80gb"), ("H100", "h100-sxm-80gb"), ("TPU v5p", "tpu-v5p"), ("v6e", "tpu-v6e"),
    ("Trillium", "tpu-v6e"), ("GB200-NVL72", "gb200"), ("MI300X", "mi300x"), ("a100_40gb", "a100-sxm-40gb"),
    # As published tables print them: vendor, system, memory type, SXM generation and TPU slice sizes around the part.
    ("NVIDIA H100 80GB HBM3", "h100-sxm-80gb"), ("H100 SXM5 80GB", "h100-sxm-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"), ("DGX B200", "b200"), ("B200 HGX", "b200"),
    ("AMD Instinct MI300X", "mi300x"), ("H200 SXM 141GB", "h200"), ("H800 SXM", "h800"), ("Google TPU v5p", "tpu-v5p"),
    ("v5p-1024", "tpu-v5p"), ("tpu-v5e-256", "tpu-v5e"), ("v5litepod-256", "tpu-v5e"), ("TPU v5 lite", "tpu-v5e"),
    ("v4-4096", "tpu-v4"),
    # PCIe and NVL cards, export parts and the later AMD parts are parts of their own, not their SXM sibling.
    ("NVIDIA H100 PCIe", "h100-pcie"), ("H100 80GB PCIe", "h100-pcie"), ("H100 NVL", "h100-nvl"),
    ("nvidia-h100-nvl-94gb", "h100-nvl"), ("H20", "h20"), ("NVIDIA L40S", "l40s"), ("A100 80GB PCIe", "a100-pcie-80gb"),
    ("A100-PCIe-40GB", "a100-pcie-40gb"), ("AMD Instinct MI325X", "mi325x"), ("MI355X", "mi355x"), ("mi350x", "mi350x"),
])
def test_a_part_is_found_by_its_id_or_a_common_spelling(name: str, catalog_id: str) -> None:
    assert get_accelerator(name).id == catalog_id


def test_an_ambiguous_or_unknown_part_lists_the_ids() -> None:
    # The catalog holds A100s of 40 and 80 GB, SXM and PCIe: "a100" and "a100 pcie" alone are not guessed.
    for name in ("a100", "a100 pcie", "tpu-v9", "A800"):
        with pytest.raises(KeyError, match=f"unknown hardware {name!r}; known: a100-pcie-40gb, a100-pcie-80gb"):
            get_accelerator(name)


@pytest.mark.parametrize(("device_name", "catalog_id"), [
    ("NVIDIA H100 80GB HBM3", "h100-sxm-80gb"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA H20", "h20"), ("NVIDIA GH200 480GB", "h200"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"), ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-pcie-40gb"), ("AMD Instinct MI325X", "mi325x"),
])
def test_a_cuda_device_name_finds_its_part(device_name: str, catalog_id: str) -> None:
    # H20 is a substring of H200 and H200 of GH200: the more specific names are matched first.
    accelerator = match_device_name(device_name)
    assert accelerator is not None and accelerator.id == catalog_id


def test_every_catalog_row_parses_into_its_columns_and_names_its_generation() -> None:
    # An unquoted comma in a row's notes would spill into a column the header does not have and lose the text.
    with open(CATALOG_CSV, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert all(len(row) == len(rows[0]) for row in rows[1:])
    listed = {accelerator for profile in efficiency_table().values() for accelerator in profile.accelerators}
    assert set(load_catalog()) == listed  # no part silently borrows Hopper's efficiencies


def test_pcie_cards_are_slower_than_their_sxm_sibling_and_cdna4_doubles_cdna3() -> None:
    sxm, pcie, nvl = (get_accelerator(name) for name in ("h100-sxm-80gb", "h100-pcie", "h100-nvl"))
    assert pcie.peak_flops("bf16") < nvl.peak_flops("bf16") < sxm.peak_flops("bf16")
    assert pcie.scaleup_domain == nvl.scaleup_domain == 2  # NVLink bridge pairs
    mi300x, mi355x = get_accelerator("mi300x"), get_accelerator("mi355x")
    assert mi355x.peak_flops("fp8") / mi300x.peak_flops("fp8") == pytest.approx(256 * 8192 * 2.4 / (304 * 4096 * 2.1),
                                                                                   rel=1e-3)
