"""The documentation site: it builds with `mkdocs build --strict`, and its generated references cover the code.

The CLI and configuration references are rendered by docs/hooks/reference.py; these tests walk the typer app and
the pydantic models on their own and check that every command, option and key is there, described, and that the
committed copies under docs/reference/ are what the code renders now.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]


def _load_reference() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "hooks" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def _page(name: str) -> str:
    return (ROOT / "docs" / "reference" / name).read_text()


def _sections(text: str) -> dict[str, str]:
    """A page's second-level sections by heading."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2])}


def test_committed_references_are_what_the_code_renders() -> None:
    for page in reference.PAGES:
        committed = (ROOT / "docs" / page).read_text()
        assert committed == reference.render(page), f"docs/{page} is stale: run `python docs/hooks/reference.py`"


def test_every_command_and_option_is_in_the_cli_reference_with_its_help() -> None:
    sections = _sections(_page("cli.md"))
    commands = list(reference.walk_cli(reference.cli_root()))
    assert {"aiinfra train", "aiinfra serve", "aiinfra route", "aiinfra plan train", "aiinfra bench comm"} <= {
        path for path, _ in commands
    }
    for path, command in commands:
        assert path in sections, f"{path} is missing from docs/reference/cli.md"
        assert command.help, f"{path} has no help text (its function's docstring)"
        for param in reference.visible_params(command):
            names = [param.name.upper()] if reference._is_argument(param) else [*param.opts, *param.secondary_opts]
            for name in names:
                assert f"`{name}" in sections[path] or f"/ {name}`" in sections[path], f"{path} {name} is missing"
            assert getattr(param, "help", None), f"{path} {names[0]} has no help= text"


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str | None]]:
    """Every key a file of `model` can hold, with its description, found without the generator's walker."""
    keys = []
    for name, field in model.model_fields.items():
        nested = [
            arg
            for arg in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(arg, type) and issubclass(arg, BaseModel)
        ]
        if nested:
            inner = f"{prefix}{name}.NAME." if typing.get_origin(field.annotation) is dict else f"{prefix}{name}."
            keys += _leaf_keys(nested[0], inner)
        else:
            keys.append((f"{prefix}{name}", field.description))
    return keys


def test_every_config_key_is_in_the_config_reference_with_a_description() -> None:
    text = _page("config.md")
    files = reference.config_models()
    assert {model.__name__ for _, _, model in files} >= {"Config", "FleetConfig"}
    for title, _, model in files:
        assert f"## {title}" in text
        keys = _leaf_keys(model)
        assert len(keys) > 10
        for key, description in keys:
            assert f"| `{key}` |" in text, f"{title}: {key} is missing from docs/reference/config.md"
            assert description, f"{title}: {key} has no Field(description=...)"
        for table in reference.walk_config(model):
            if table["title"]:
                heading, _, field_description = table["title"].partition("|")
                assert reference.table_text(table["model"], field_description), f"{title}: {heading} is undescribed"


def _pydantic_models_in_the_package() -> set[str]:
    """module.Class for every class under src/aiinfra that derives from BaseModel and declares a field."""
    classes: dict[str, tuple[str, list[str], bool]] = {}
    for path in (ROOT / "src" / "aiinfra").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [base.id if isinstance(base, ast.Name) else getattr(base, "attr", "") for base in node.bases]
                has_fields = any(isinstance(item, ast.AnnAssign) for item in node.body)
                classes[f"{module}.{node.name}"] = (node.name, bases, has_fields)
    models, names = set(), {"BaseModel"}
    while True:  # a class is a model if one of its bases is (by name, through the package's own bases)
        found = {name for name, (_, bases, _) in classes.items() if set(bases) & names} - models
        if not found:
            break
        models |= found
        names |= {classes[name][0] for name in found}
    return {name for name in models if classes[name][2]}


def test_every_pydantic_model_is_a_documented_file_or_excused() -> None:
    documented = set()
    for _, _, model in reference.config_models():
        for table in reference.walk_config(model):
            documented.add(f"{table['model'].__module__}.{table['model'].__name__}")
    excused = reference.NOT_USER_CONFIG
    for name in sorted(_pydantic_models_in_the_package()):
        module = name.rsplit(".", 1)[0]
        assert name in documented or name in excused or module in excused, (
            f"{name} is a pydantic model that is neither reachable from a file in CONFIG_FILES nor listed in "
            "NOT_USER_CONFIG (docs/hooks/reference.py): add it to one of them"
        )


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        message = "mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir"]
    return subprocess.run([*command, str(site)], capture_output=True, text=True, env=env, timeout=180)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    built = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "aiinfra plan train" in built and "--set" in built
    assert not (tmp_path / "site" / "hooks").exists()


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a") as page:
        page.write("\nSee [a page that is not there](missing.md) and [an anchor](training.md#no-such-heading).\n")
    result = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "missing.md" in result.stderr and "no-such-heading" in result.stderr


def test_the_readme_links_to_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    relative = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in relative)
    for link in relative:
        assert (ROOT / link).exists(), f"README.md links to {link}, which does not exist"
