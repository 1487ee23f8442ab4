"""`--config YAML` for every command: options not on the command line come from the file, typed as their flags."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from vitray.errors import VitrayError


def read_yaml_mapping(path: str) -> dict[str, Any]:
    """A YAML file of `option: value` (local or s3://); one-line errors otherwise."""
    import yaml

    from vitray import storage

    try:
        values = yaml.safe_load(storage.read_bytes(path)) or {}
    except yaml.YAMLError as exc:
        raise VitrayError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise VitrayError(f"{path}: a config must be a mapping of option: value")
    return values


_UNSET = object()  # an option's value while parsing: "not on the command line"


def configurable(parser: argparse.ArgumentParser) -> None:
    """Give a command `--config YAML` and keep what the command line really gave apart from defaults."""
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="options from a YAML file (keys are option names, - or _; flags given override it)")
    if "--verbose" not in parser._option_string_actions:
        parser.add_argument("--verbose", action="store_true", help="show the libraries' own logs and tracebacks")
    defaults, required = {}, []
    for action in parser._actions:  # argparse has no public view of a parser's options
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        defaults[action.dest] = action.default
        action.default = _UNSET
        if action.required:
            required.append(action)
            action.required = False  # it may come from --config: checked after merging
    parser.set_defaults(option_defaults=defaults, required_options=required)


def merge_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Options not on the command line from `--config` (typed as their flag would be), else their default."""
    values = read_yaml_mapping(args.config) if args.config else {}
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    by_key = {**{opt.lstrip("-").replace("-", "_"): a for a in actions.values() for opt in a.option_strings},
              **actions}
    extra_of = getattr(args, "config_extra", None)  # the config dataclass whose every field a config may set
    extra = {f.name for f in dataclasses.fields(extra_of)} if extra_of is not None else set()
    unknown = sorted(str(k) for k in values if str(k).replace("-", "_") not in by_key and
                     str(k).replace("-", "_") not in extra or str(k) in ("help", "config"))
    if unknown:
        raise VitrayError(f"{args.config}: unknown option(s) {', '.join(unknown)} for 'vitray {args.command}'")
    for key, value in values.items():
        name = str(key).replace("-", "_")
        action = by_key.get(name)
        dest = action.dest if action else name
        if getattr(args, dest, _UNSET) is not _UNSET and action is not None:
            continue  # given on the command line
        setattr(args, dest, typed(action, value, args.config, key) if action else
                typed_field(extra_of, name, value, args.config, key))
    for dest, default in args.option_defaults.items():
        if getattr(args, dest, _UNSET) is _UNSET:
            setattr(args, dest, default)
    for action in args.required_options:
        if getattr(args, action.dest) is None:
            raise VitrayError(f"{action.option_strings[0]} is required (on the command line or in --config)")
    return args


def typed(action: argparse.Action, value: Any, path: str, key: Any) -> Any:
    """A YAML value as its flag would have parsed it (YAML reads `1e-4` as a string)."""
    if value is None:
        return None
    if action.nargs == 0:  # a switch such as --verbose
        return switch(value, path, key)
    if action.type is None:
        typed = value  # strings, and tune's SPACEs as written (a list is a choice)
    else:
        try:
            typed = [action.type(str(v)) for v in value] if isinstance(value, list) and action.nargs else \
                action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise VitrayError(f"{path}: {key}: {exc}") from None
    if action.choices is not None and typed not in action.choices:
        raise VitrayError(f"{path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return typed


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def switch(value: Any, path: str, key: Any) -> bool:
    """A YAML switch: true or false (YAML's own booleans, or the words true/false, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise VitrayError(f"{path}: {key} must be true or false, got {value!r}")


def typed_field(cls: Any, name: str, value: Any, path: str, key: Any) -> Any:
    """A YAML value for a config field that has no flag, checked against the field's type."""
    hint = typing.get_type_hints(cls)[name]
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise VitrayError(f"{path}: {key} needs a value")
    for kind in (bool, int, float, str):
        if kind not in allowed:
            continue
        if kind is bool:
            if isinstance(value, bool) or isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return switch(value, path, key)
        elif isinstance(value, bool):
            continue
        elif kind is str and isinstance(value, (str, int, float)):
            return str(value)
        else:
            try:  # YAML reads 1e-4 as a string: a number as its flag would parse it
                return kind(value) if isinstance(value, (int, float)) and kind is float else kind(str(value))
            except ValueError:
                continue
    words = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
    wanted = " or ".join(words.get(k, getattr(k, "__name__", str(k))) for k in allowed if k is not type(None))
    raise VitrayError(f"{path}: {key} must be {wanted}, got {value!r}")
