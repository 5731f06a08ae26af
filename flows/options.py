"""A command line built from a flow's parameters: one option per parameter, with the type,
constraint, description and default that the flow declares, so the two cannot drift apart."""

from __future__ import annotations

import argparse
import inspect
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError


def _literal_choices(hint: Any) -> list[str]:
    """The allowed values of a Literal inside `hint` (a list of, or an Optional of, one)."""
    if typing.get_origin(hint) is typing.Literal:
        return [str(value) for value in typing.get_args(hint)]
    for arg in typing.get_args(hint):
        if choices := _literal_choices(arg):
            return choices
    return []


def _description(hint: Any) -> str:
    for meta in getattr(hint, "__metadata__", ()):
        if getattr(meta, "description", None):
            return str(meta.description)
    return ""


def _base(hint: Any) -> Any:
    """The type inside an Annotated hint."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _is_list(hint: Any) -> bool:
    return typing.get_origin(_base(hint)) is list


def _converter(flag: str, hint: Any) -> Callable[[str], Any]:
    adapter = TypeAdapter(hint)
    is_list = _is_list(hint)

    def convert(text: str) -> Any:
        value: Any = [part.strip() for part in text.split(",") if part.strip()] if is_list else text
        try:
            value = adapter.validate_python(value)
        except ValidationError as error:
            problem = error.errors()[0]
            raise argparse.ArgumentTypeError(f"{text!r}: {problem['msg'].lower()}") from None
        return list(dict.fromkeys(value)) if is_list else value

    convert.__name__ = flag  # argparse names the type in some messages
    return convert


def add_flow_options(
    parser: argparse.ArgumentParser,
    function: Callable[..., Any],
    *,
    env: Mapping[str, str] = {},
    optional_value: Mapping[str, str] = {},
) -> None:
    """Add `--name` for each parameter of `function`.

    Args:
        parser: The parser to add to.
        function: The flow's function, whose parameters are `Annotated` with a pydantic
            `Field` (description and constraints).
        env: Parameter name -> environment variable that overrides its default.
        optional_value: Parameter name -> the value a bare `--name` (no value) means.
    """
    hints = typing.get_type_hints(function, include_extras=True)
    for name, parameter in inspect.signature(function).parameters.items():
        hint = hints[name]
        flag = "--" + name.replace("_", "-")
        default = parameter.default
        if name in env and env[name] in os.environ:
            default = os.environ[env[name]]  # a string: argparse converts and checks it
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = _description(hint)
        if choices := _literal_choices(hint):
            how = "comma-separated, from" if _is_list(hint) else "one of"
            help_text += f"; {how} {', '.join(choices)}"
        help_text += f" (default: {'none' if shown is None else shown}"
        help_text += f"; env {env[name]})" if name in env else ")"
        options: dict[str, Any] = {  # add_argument's keyword arguments, of mixed types
            "default": default,
            "type": _converter(flag, hint),
            "help": help_text.replace("%", "%%"),
            "metavar": name.upper(),
        }
        if _base(hint) is bool:  # a switch: --offline, --no-offline
            options = {
                "default": default,
                "action": argparse.BooleanOptionalAction,
                "help": options["help"],
            }
        elif name in optional_value:
            options.update(nargs="?", const=optional_value[name])
        parser.add_argument(flag, **options)


def flow_parameters(args: argparse.Namespace, function: Callable[..., Any]) -> dict[str, Any]:
    """The parsed options that are `function`'s parameters, by name (its keyword arguments,
    each of its own type)."""
    return {name: getattr(args, name) for name in inspect.signature(function).parameters}
