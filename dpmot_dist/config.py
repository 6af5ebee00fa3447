"""Typed configuration, validated once at the edge.

Each verb has a pydantic model (``extra="forbid"``). Values come from, in increasing
priority: the model's defaults, a YAML file (``--config FILE``; either flat keys or a
section named after the verb), and command-line flags generated from the model's fields
(``--field-name``; booleans get ``--x/--no-x``). Library code receives the model, never an
argparse namespace or a raw dict.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dpmot_dist import storage
from dpmot_dist.errors import DpmotError


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
        where = ".".join(str(p) for p in err["loc"]) or "config"
        source = f"{config_file}: " if config_file else ""
        raise DpmotError(f"{source}option {where!r}: {err['msg']}") from None


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


def add_model_flags(parser: argparse.ArgumentParser, model: type[Config]) -> None:
    """Add ``--field-name`` for every field of ``model`` (default None: 'not given')."""
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = info.description or ""
        if _is_bool(info.annotation):
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        typ, choices = _flag_type(info.annotation)
        if typing.get_origin(info.annotation) in (list, tuple):
            parser.add_argument(
                flag,
                dest=name,
                default=None,
                help=help_text,
                type=lambda s: [float(v) for v in s.split(",")],
            )
            continue
        parser.add_argument(
            flag, dest=name, type=typ, choices=choices, default=None, help=help_text
        )


def config_from_args(model: type[C], args: argparse.Namespace, section: str) -> C:
    """The verb's config from ``--config`` and the flags of :func:`add_model_flags`."""
    overrides = {name: getattr(args, name, None) for name in model.model_fields}
    return build_config(model, getattr(args, "config", None), overrides, section)
