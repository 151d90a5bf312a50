"""The generated references: the CLI from the typer app, the configuration from the pydantic models.

Used three ways, so that neither page can drift from the code:
- as a MkDocs hook (mkdocs.yml `hooks:`): every build renders both pages from the code of the checkout it builds,
  in place of the committed copies;
- `python docs/hooks/reference.py` rewrites the committed copies under docs/reference/ (what GitHub shows);
- tests/test_docs.py fails when a committed copy differs from what the code renders.

Nothing here is written by hand per command or per key: a text is changed where it is defined, in a command's
docstring or an option's `help=`, or in a field's `Field(description=...)`. New commands, sub-apps, sections and
fields appear by themselves; a new file of settings the user writes is one line in `CONFIG_FILES`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAGES = {"reference/cli.md": "cli", "reference/config.md": "config"}

# Every file of settings a user writes: (title, the pydantic model of the whole file, how it is read).
CONFIG_FILES = (
    (
        "Training configuration",
        "aiinfra.config:Config",
        "the TOML file of `aiinfra train CONFIG` (and of `aiinfra plan train --config`), each key also settable as "
        "`--set section.key=value`. The `model.*` defaults below are those of the `tiny` preset: `model.preset` "
        "picks another shape and any other `model.*` key overrides one of its fields",
    ),
    ("FLEET.toml", "aiinfra.route.fleet:FleetConfig", "the file of `aiinfra route FLEET.toml`"),
)
# Pydantic models in the package that no user writes as a file, and where they are documented instead.
NOT_USER_CONFIG = {
    "aiinfra.serve.protocol": "the bodies of HTTP requests to `aiinfra serve` (serving.md, API behaviour)",
    "aiinfra.serve.engine.EngineConfig": "built from the flags of `aiinfra serve` (the CLI reference)",
}


def _use_checkout() -> None:
    """Document the checkout being built, not whichever aiinfra is installed elsewhere."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def _text(text: str) -> str:
    """Prose from the code as Markdown: `<run.dir>` outside code spans is text, not an HTML tag."""
    parts = str(text).split("`")
    for index in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[index] = parts[index].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell."""
    return _text(" ".join(str(text).split())).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------------------- CLI


def _type_name(annotation: Any) -> str:
    """A Python annotation as a reader names it: `int`, `path`, `str, repeatable`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        kept = [arg for arg in args if arg is not type(None)]
        return " or ".join(_type_name(arg) for arg in kept)
    if origin in (list, tuple, set):
        return f"{_type_name(args[0])}, repeatable" if args else "list"
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{arg}`" for arg in args)
    if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, Path)):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _command_hints(command: Any) -> dict[str, Any]:
    """The annotations of the function behind a click command (through typer's and our decorators)."""
    callback = getattr(command, "callback", None)
    if callback is None:
        return {}
    function = inspect.unwrap(callback)
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # an annotation that cannot be resolved: fall back to click's view of the parameter
        return {}


def _param_bounds(hint: Any) -> str:
    infos = typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()
    bounds = []
    for info in infos:
        if getattr(info, "min", None) is not None:
            bounds.append(f">= {info.min}")
        if getattr(info, "max", None) is not None:
            bounds.append(f"<= {info.max}")
    return ", ".join(bounds)


def _param_type(param: Any, hint: Any) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    if hint is not None:
        name = _type_name(hint)
    else:
        click_type = getattr(param, "type", None)
        name = getattr(click_type, "name", "text")
        if getattr(param, "multiple", False):
            name += ", repeatable"
    bounds = _param_bounds(hint)
    return f"{name} ({bounds})" if bounds else name


def _param_default(param: Any) -> str:
    default = getattr(param, "default", None)
    if getattr(param, "required", False):
        return "required"
    if callable(default) or default is None or default == () or default == []:
        return "-"
    if getattr(param, "is_flag", False) or isinstance(default, bool):
        names = param.opts if default else (param.secondary_opts or ["off"])
        return f"`{names[0]}`" if names[0].startswith("-") else names[0]
    return f"`{_plain(default)}`"


def _plain(value: Any) -> str:
    """A default as typed on a command line: quoted only where spaces or emptiness would hide it."""
    if isinstance(value, float):
        return format(value, "g") if abs(value) >= 1e6 else repr(value)
    text = str(value)
    return json.dumps(text) if text != text.strip() or not text else text


def _param_name(param: Any) -> str:
    if getattr(param, "param_type_name", "") == "argument" or type(param).__name__.endswith("Argument"):
        return f"`{param.name.upper()}`"
    names = " / ".join([*param.opts, *param.secondary_opts])
    return f"`{names}`"


def _usage(path: str, command: Any) -> str:
    pieces = [path]
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    if any(not _is_argument(p) for p in params):
        pieces.append("[OPTIONS]")
    if _subcommands(command):
        pieces.append("COMMAND [ARGS]...")
    for param in params:
        if _is_argument(param):
            name = param.name.upper() + ("..." if getattr(param, "nargs", 1) == -1 else "")
            pieces.append(name if param.required else f"[{name}]")
    return " ".join(pieces)


def _is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument" or type(param).__name__.endswith("Argument")


def _subcommands(command: Any) -> dict[str, Any]:
    return dict(getattr(command, "commands", {}) or {})


def walk_cli(command: Any, path: str = "aiinfra") -> Iterator[tuple[str, Any]]:
    """(full command path, click command) for the command and every command below it, in definition order."""
    yield path, command
    for name, sub in _subcommands(command).items():
        if not getattr(sub, "hidden", False):
            yield from walk_cli(sub, f"{path} {name}")


def cli_root() -> Any:
    """The click command that typer builds from `aiinfra.cli.app`."""
    _use_checkout()
    import typer

    return typer.main.get_command(importlib.import_module("aiinfra.cli").app)


def visible_params(command: Any) -> list[Any]:
    """The parameters a user can pass (hidden ones and --help left out)."""
    return [param for param in command.params if not getattr(param, "hidden", False)]


def _first_line(text: str | None) -> str:
    return (inspect.cleandoc(text or "").split("\n\n")[0]).replace("\n", " ")


def render_cli() -> str:
    """docs/reference/cli.md."""
    root = cli_root()
    commands = list(walk_cli(root))
    lines = [
        "# CLI reference",
        "",
        "<!-- Generated by docs/hooks/reference.py from the typer app `aiinfra.cli.app`; do not edit. -->",
        "Generated from the typer app (`aiinfra.cli.app`) at every build of this site: every command, argument and "
        "option with its type, default and help, as `aiinfra COMMAND --help` prints them. A text is changed in the "
        "code (the command's docstring, the option's `help=`), never here.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for path, command in commands[1:]:
        anchor = path.replace(" ", "-")
        lines.append(f"| [`{path}`](#{anchor}) | {_cell(_first_line(command.help))} |")
    for path, command in commands:
        lines += ["", f"## {path}", ""]
        if command.help:
            lines += [_text(inspect.cleandoc(command.help)), ""]
        lines += ["```", _usage(path, command), "```"]
        subcommands = _subcommands(command)
        if subcommands and path != "aiinfra":
            lines += ["", "| command | what it does |", "|---|---|"]
            for name, sub in subcommands.items():
                lines.append(
                    f"| [`{path} {name}`](#{(path + ' ' + name).replace(' ', '-')}) | {_cell(_first_line(sub.help))} |"
                )
        params = visible_params(command)
        if params:
            hints = _command_hints(command)
            lines += ["", "| argument or option | type | default | description |", "|---|---|---|---|"]
            for param in params:
                help_text = getattr(param, "help", None) or ""
                envvar = getattr(param, "envvar", None)
                if envvar:
                    help_text += f" (environment: `{envvar}`)"
                row = [
                    _param_name(param),
                    _cell(_param_type(param, hints.get(param.name))),
                    _param_default(param),
                    _cell(help_text),
                ]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- config


def _model_class(annotation: Any) -> tuple[type | None, bool]:
    """(the pydantic model inside an annotation, whether it is a list or table of them), or (None, False)."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kept = [arg for arg in args if arg is not type(None)]
        return _model_class(kept[0]) if len(kept) == 1 else (None, False)
    if origin in (list, dict) and args:
        inner, _ = _model_class(args[-1])
        return inner, inner is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _field_type(field: Any) -> str:
    from pydantic import SecretStr

    def name(annotation: Any) -> str:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            return " or ".join(name(arg) for arg in args if arg is not type(None))
        if origin is typing.Literal:
            return "one of " + ", ".join(f"`{json.dumps(arg)}`" for arg in args)
        if origin is list:
            return f"list of {name(args[0])}"
        if origin is dict:
            return f"table of {name(args[0])} to {name(args[1])}"
        if annotation is SecretStr:
            return "str (secret)"
        return getattr(annotation, "__name__", str(annotation))

    text = name(field.annotation)
    bounds = []
    for rule in field.metadata:
        for attribute, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "length >=")):
            value = getattr(rule, attribute, None)
            if value is not None:
                bounds.append(f"{sign} {value}")
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _toml_value(value: Any) -> str:
    from pydantic import BaseModel, SecretStr

    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return '`"**********"`'
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and abs(value) >= 1e6:
        return f"`{value:g}`"
    if isinstance(value, str | int | float):
        return f"`{json.dumps(value)}`"
    return f"`{json.dumps(value, default=str)}`"


def _field_default(field: Any, instance: Any, name: str) -> str:
    if instance is not None:
        return _toml_value(getattr(instance, name))
    if field.is_required():
        return "required"
    return _toml_value(field.get_default(call_default_factory=True))


def walk_config(model: type, prefix: str = "", instance: Any = None, title: str = "") -> Iterator[dict[str, Any]]:
    """One entry per table of a settings file: its key, heading, text and fields, nested tables after it."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner, repeated = _model_class(field.annotation)
        if inner is not None:
            child = None
            if not repeated:
                default = field.get_default(call_default_factory=True) if not field.is_required() else None
                child = getattr(instance, name) if instance is not None else default
            kind = "dict" if repeated and typing.get_origin(_strip_optional(field.annotation)) is dict else "list"
            nested.append((inner, key, child, repeated and kind, field.description or ""))
            continue
        rows.append(
            {
                "key": key,
                "type": _field_type(field),
                "default": _field_default(field, instance, name),
                "description": field.description or "",
            }
        )
    yield {"key": prefix.rstrip("."), "model": model, "title": title, "rows": rows}
    for inner, key, child, repeated, description in nested:
        if repeated == "dict":  # a table of tables: [key.NAME] for any NAME
            key = f"{key}.NAME"
        heading = f"[[{key}]]" if repeated == "list" else f"[{key}]"
        yield from walk_config(inner, f"{key}.", child, f"{heading}|{description}")


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def table_text(model: type, field_description: str) -> str:
    """What a table is for: its model's docstring, else the description of the field that holds it."""
    text = inspect.cleandoc(model.__doc__ or "") if model.__doc__ and not _inherited_doc(model) else ""
    if not text and field_description:
        text = field_description[0].upper() + field_description[1:]
        text += "" if text.endswith(".") else "."
    return _text(text)


def _inherited_doc(model: type) -> bool:
    """pydantic models inherit their base's docstring; only a model's own one describes it."""
    return "__doc__" not in vars(model) or vars(model)["__doc__"] is None


def config_models() -> list[tuple[str, str, type]]:
    """(title, how it is read, model) for each file in `CONFIG_FILES`."""
    _use_checkout()
    found = []
    for title, target, read_by in CONFIG_FILES:
        module, _, name = target.partition(":")
        found.append((title, read_by, getattr(importlib.import_module(module), name)))
    return found


def _root_instance(model: type) -> Any:
    """The file's defaults as one object when every key has a default (the training config), else None."""
    try:
        return model()
    except Exception:  # a required key (FLEET.toml's backends): defaults come from each model class
        return None


def render_config() -> str:
    """docs/reference/config.md."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by docs/hooks/reference.py from the pydantic models; do not edit. -->",
        "Generated from the pydantic models at every build of this site: every key of every file a user writes, "
        "with its type, default and description. A description is changed in the code "
        "(`Field(description=...)`), never here. An unknown key or a bad value is refused before any work, with "
        "one line naming it.",
    ]
    for title, read_by, model in config_models():
        lines += ["", f"## {title}", "", f"Read from {read_by}; the model is `{model.__module__}.{model.__name__}`."]
        if model.__doc__:
            lines += ["", _text(inspect.cleandoc(model.__doc__))]
        for table in walk_config(model, instance=_root_instance(model)):
            if table["title"]:
                heading, _, description = table["title"].partition("|")
                lines += ["", f"### `{heading}`", "", table_text(table["model"], description), ""]
            elif table["rows"]:
                lines += [""]
            if table["rows"]:
                lines += ["| key | type | default | description |", "|---|---|---|---|"]
                for row in table["rows"]:
                    lines.append(
                        f"| `{row['key']}` | {_cell(row['type'])} | {_cell(row['default'])} | "
                        f"{_cell(row['description'])} |"
                    )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ pages, hooks


def render(page: str) -> str:
    """The Markdown of one generated page, by its path under docs/."""
    return {"cli": render_cli, "config": render_config}[PAGES[page]]()


def write_pages(docs_dir: Path = ROOT / "docs") -> list[Path]:
    """Rewrite the committed copies; returns the files that changed."""
    changed = []
    for page in PAGES:
        path = docs_dir / page
        text = render(page)
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    return changed


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: the generated pages come from the code of this build, whatever the committed copies say."""
    from mkdocs.structure.files import File

    for page in PAGES:
        existing = files.get_file_from_path(page)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, page, content=render(page)))
    return files


if __name__ == "__main__":
    for path in write_pages():
        print(f"wrote {path.relative_to(ROOT)}")
