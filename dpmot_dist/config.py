"""Typed configuration, validated once at the edge.

Each verb has a pydantic model (``extra="forbid"``). Values come from, in increasing
priority: the model's defaults, a YAML file (``--config FILE``; either flat keys or a
section named after the verb), and command-line flags generated from the model's fields
(``--field-name``; booleans get ``--x/--no-x``). Library code receives the model, never an
argparse namespace or a raw dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import storage


class Config(BaseModel):
    """Base of every verb's configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)


C = typing.TypeVar("C", bound="Config")


def read_config_file(uri: str, section: str) -> dict[str, Any]:
    """The mapping in a YAML config file (its ``section`` if it has one)."""
    try:
        data = yaml.safe_load(storage.read_bytes(uri).decode()) or {}
    except yaml.YAMLError as e:
        raise DpmotError(f"{uri}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DpmotError(f"{uri}: expected a mapping of option names to values")
    if isinstance(data.get(section), dict):
        data = data[section]
    return data


def build_config(
    model: type[C], config_file: str | None, overrides: dict[str, Any], section: str
) -> C:
    """Defaults < config file < non-None overrides; a one-line error on any bad value."""
    values = read_config_file(config_file, section) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = _option_name(model, err["loc"])
        source = f"{config_file}: " if config_file else ""
        raise DpmotError(f"{source}option {where!r}: {err['msg']}") from None


def _option_name(model: type[Config], loc: tuple) -> str:
    """The option a validation error is about: ``lr``, not ``solver.lr`` (flat keys)."""
    parts = [str(p) for p in loc]
    info = model.model_fields.get(parts[0]) if parts else None
    if info is not None and dataclasses.is_dataclass(info.annotation) and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts) or "config"


def _flag_type(annotation: Any) -> tuple[Any, list | None]:
    """argparse ``type`` and ``choices`` for a field annotation (Optional unwrapped)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _flag_type(inner[0]) if len(inner) == 1 else (str, None)
    if typing.get_origin(annotation) is Literal:
        return type(args[0]), list(args)
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def _is_bool(annotation: Any) -> bool:
    """``bool`` or ``bool | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)] == [bool]
    return annotation is bool


@dataclasses.dataclass(frozen=True)
class _Flag:
    """One command-line option: the field it sets, its type, default and help."""

    name: str
    annotation: Any
    default: Any
    help: str
    required: bool = False


def nested_fields(model: type[Config], name: str) -> tuple[str, ...]:
    """The fields of the options dataclass ``name`` that ``model`` takes as flat keys:
    ``model.FLAT[name]``, by default all of them."""
    info = model.model_fields[name]
    flat = getattr(model, "FLAT", {})
    return tuple(flat.get(name, (f.name for f in dataclasses.fields(info.annotation))))


def _flags(model: type[Config]) -> list[_Flag]:
    """The options of ``model``: its fields, with a dataclass-typed field (e.g. the fit's
    ``solver``) replaced by the dataclass's own fields (flat flags and config keys)."""
    out = []
    for name, info in model.model_fields.items():
        if dataclasses.is_dataclass(info.annotation):
            hints = typing.get_type_hints(info.annotation)
            fields = {f.name: f for f in dataclasses.fields(info.annotation)}
            for sub in nested_fields(model, name):
                f = fields[sub]
                out.append(_Flag(sub, hints[sub], f.default, f.metadata.get("help", "")))
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        out.append(
            _Flag(name, info.annotation, default, info.description or "", info.is_required())
        )
    return out


def _show_default(flag: _Flag) -> str:
    """`` (default: X)`` for the help text; required options say so."""
    if flag.required:
        return " (required)"
    if flag.default is None and "default" in flag.help:
        return ""  # the help says what happens when it is not given
    value = flag.default
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    return f" (default: {value})"


def add_model_flags(parser: argparse.ArgumentParser, model: type[Config]) -> None:
    """Add ``--field-name`` for every option of ``model`` (argparse default None: 'not
    given'), each help showing the option's default, in the argparse groups named by
    ``model.GROUPS`` (title → field names; the rest go under 'other options')."""
    groups = getattr(model, "GROUPS", {})
    containers = {title: parser.add_argument_group(f"{title} options") for title in groups}
    group_of = {name: title for title, names in groups.items() for name in names}
    nested = {
        sub: group_of[name]
        for name, info in model.model_fields.items()
        if dataclasses.is_dataclass(info.annotation) and name in group_of
        for sub in nested_fields(model, name)
    }
    group_of = {**nested, **group_of}
    for flag in _flags(model):
        title = group_of.get(flag.name, "other")
        if title not in containers:
            containers[title] = parser.add_argument_group(f"{title} options")
        _add_flag(containers[title], flag)


def _add_flag(parser: argparse._ActionsContainer, flag: _Flag) -> None:
    option = "--" + flag.name.replace("_", "-")
    help_text = (flag.help + _show_default(flag)).strip()
    if _is_bool(flag.annotation):
        parser.add_argument(
            option,
            dest=flag.name,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=help_text,
        )
        return
    typ, choices = _flag_type(flag.annotation)
    if typing.get_origin(flag.annotation) in (list, tuple):
        typ, choices = (lambda s: [float(v) for v in s.split(",")]), None
    parser.add_argument(
        option, dest=flag.name, type=typ, choices=choices, default=None, help=help_text
    )


def config_from_args(model: type[C], args: argparse.Namespace, section: str) -> C:
    """The verb's config from ``--config`` and the flags of :func:`add_model_flags`."""
    overrides = {f.name: getattr(args, f.name, None) for f in _flags(model)}
    return build_config(model, getattr(args, "config", None), overrides, section)
