"""Configs: one dataclass per stage, read from YAML (`yaml.safe_load`) with command-line overrides.

TRL's `TrlParser` does the parsing: ``--config FILE`` sets defaults from YAML, flags override them, and keys that
no field declares are errors. A run writes its resolved config back next to its checkpoint (`dump_config`), so a
config file is the whole record of a run.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# Fields whose values must never reach a log, a config dump or a manifest.
SECRET_FIELDS = re.compile(r"(token|secret|password|api_key)$", re.IGNORECASE)
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "HF_API_TOKEN")


class ConfigError(ValueError):
    """A config that cannot run: the message names the file or field."""


# A field's declared type -> the values it takes, for the types a YAML file can get wrong (a string for a number,
# a number for a path, a list for a scalar). bool is an int to Python, never a number here.
_SCALARS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def check_field_types(config: Any) -> None:
    """Values of the types the config's fields declare, at parse time: argparse converts a value given on the
    command line, but a YAML value arrives as YAML typed it. A list field given one value (`train_data:
    file.jsonl`) holds that value; anything else of the wrong type is a `ConfigError` naming the field, not a
    traceback after training (or a run that silently iterates over a path's characters)."""
    # Our own fields, as written (strings, under `from __future__ import annotations`): the argument parser
    # rewrites the types of the dataclass fields it reads (`str | None` becomes `str`), and the trainer's
    # arguments are transformers' to check.
    annotations: dict[str, Any] = {}
    for cls in reversed(type(config).__mro__):
        if cls.__module__.startswith("rlhf."):
            annotations.update(getattr(cls, "__annotations__", {}))
    for name, written in annotations.items():
        declared = str(written).removesuffix(" | None")
        value = getattr(config, name, None)
        is_list = declared.startswith("list[")
        kind = declared[5:-1] if is_list else declared
        if value is None or kind not in _SCALARS:
            continue
        if is_list and not isinstance(value, list):
            value = [value]
            setattr(config, name, value)
        values = value if is_list else [value]
        if any(not isinstance(v, _SCALARS[kind]) or isinstance(v, bool) and kind != "bool" for v in values):
            raise ConfigError(f"{name}: expected {declared}, found {value!r}")


def one_of(*allowed: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda x: x in allowed, f"one of {allowed}")


POSITIVE = (lambda x: x > 0, "above 0")
NON_NEGATIVE = (lambda x: x >= 0, "0 or more")
FRACTION = (lambda x: 0 <= x <= 1, "in [0, 1]")


def check_values(config: Any, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """field -> (test, what it must be): a value that fails its test is a `ConfigError` naming the field, at parse
    time, rather than a division by zero or a silently wrong run after the models have loaded. None (an optional
    setting left off) is not tested."""
    for name, (test, wanted) in rules.items():
        value = getattr(config, name)
        if value is not None and not test(value):
            raise ConfigError(f"{name}: must be {wanted}, found {value!r}")


def parse_config(config_cls: type[T], argv: list[str] | None = None) -> T:
    """`--config FILE` plus `--field value` overrides -> a validated `config_cls`."""
    from trl import TrlParser

    argv = list(argv) if argv is not None else None
    if argv is not None:  # `--config=FILE` is `--config FILE`, as argparse reads every other option
        argv = [
            part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])
        ]
    if argv is not None and "--config" in argv:
        if argv.index("--config") + 1 == len(argv):
            raise ConfigError("--config: expected a config file after it")
        path = argv[argv.index("--config") + 1]
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        _check_yaml(path)
    parser = TrlParser((config_cls,))
    try:
        (config,) = parser.parse_args_and_config(args=argv)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    return config


def _check_yaml(path: str) -> None:
    """Reject YAML that safe_load refuses (Python tags and the like) with the file named, and non-mappings."""
    try:
        with open(path) as handle:
            loaded = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"{mark.line + 1}" if mark else "1"
        raise ConfigError(f"{path}:{line}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}:1: expected a mapping of config fields, found {type(loaded).__name__}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-safe values; secret-looking fields are replaced, never written."""
    out = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if SECRET_FIELDS.search(f.name) and value not in (None, ""):
            value = "<redacted>"
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "value") and isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return type(value)(value) if value is not None else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        # e.g. the Trainer's AcceleratorConfig, built from a dict and read back from one: its repr would be read
        # back as a path, and the written config would not run again.
        return _plain(dataclasses.asdict(value))
    return str(value)


def redact(text: str) -> str:
    """Remove the values of known secret environment variables from a string."""
    for name in SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "<redacted>")
    return text


def dump_config(config: Any, path: str) -> None:
    from rlhf.checkpoint import write_text_atomic  # rlhf.checkpoint imports this module

    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=True))  # redacted there
