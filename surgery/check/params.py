"""Parameters: method keyword arguments plus statement-filled fields -> a validated pydantic
``Params``. Pydantic's own wording never reaches the user: each error type is mapped to a
diagnostic in the language's terms, with did-you-mean for values."""

from __future__ import annotations

import enum
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from surgery.check.program import Checking
from surgery.diagnostics import Code, did_you_mean
from surgery.source import Span

_KIND = {  # pydantic error type -> what the value must be
    "int_type": "a whole number", "int_parsing": "a whole number",
    "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "list_type": "a list", "tuple_type": "a list", "dict_type": "key=value pairs",
    "finite_number": "a finite number",
}
_BOUND = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
          "less_than_equal": "<="}


def choices(annotation: Any) -> list[str]:
    """The allowed words of a Literal/Enum field (through Optional/Union), else []."""
    out: list[str] = []
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        out += [str(a) for a in typing.get_args(annotation)]
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        out += [str(m.value) for m in annotation]
    elif origin is not None:
        for arg in typing.get_args(annotation):
            out += choices(arg)
    return out


def suggest_value(value: Any, allowed: list[str]) -> str:
    lowered = {a.lower(): a for a in allowed}
    if isinstance(value, str) and value.lower() in lowered:
        return f"did you mean `{lowered[value.lower()]}`?"
    return did_you_mean(str(value), allowed, listing="expected one of") or ""


def _shown(value: Any) -> str:
    text = str(value)
    return f"`{text if len(text) <= 40 else text[:37] + '...'}`"


def message_for(err: dict, model: type[BaseModel], name: str) -> tuple[str, str | None]:
    """(message, help) for one pydantic error on field ``name``."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    field = model.model_fields.get(name)
    if kind in ("literal_error", "enum"):
        allowed = choices(field.annotation) if field else []
        return (f"{_shown(value)} is not a valid value for `{name}`",
                suggest_value(value, allowed) or None)
    if kind in _BOUND:
        limit = next(iter(ctx.values()), "?")
        return f"`{name}` must be {_BOUND[kind]} {limit}, got {_shown(value)}", None
    if kind == "multiple_of":
        return f"`{name}` must be a multiple of {ctx.get('multiple_of')}, got {_shown(value)}", None
    if kind in _KIND:
        return f"`{name}` must be {_KIND[kind]}, got {_shown(value)}", None
    if kind in ("value_error", "assertion_error"):  # our own validators' messages
        msg = str(ctx.get("error", err["msg"])).removeprefix("Value error, ")
        return (f"invalid value for `{name}`: {msg}" if name else msg), None
    expected = getattr(field.annotation, "__name__", None) if field else None
    return (f"invalid value {_shown(value)} for `{name}`",
            f"expected {expected}" if expected else None)


def validate(cx: Checking, model: type[BaseModel], owner: str, values: dict[str, Any],
             spans: dict[str, Span], anchor: Span, codes: dict[str, Code] | None = None):
    """Validate ``values`` with ``model``; report every problem and return None on failure.
    ``owner`` names the method for messages; ``codes`` maps statement-filled fields to the code
    their wrong values get (the default is E0301)."""
    codes = codes or {}
    try:
        return model.model_validate(values)
    except ValidationError as e:
        reported = set()
        for err in e.errors(include_url=False):
            name = str(err["loc"][0]) if err["loc"] else ""
            if name in reported:  # one message per parameter (unions report every branch)
                continue
            reported.add(name)
            span = spans.get(name, anchor)
            if err["type"] == "missing":
                cx.add(Code.E0302, f"`{owner}` needs the parameter `{name}`", anchor,
                       help=f"add {name}=...")
            elif err["type"] == "extra_forbidden":
                cx.add(Code.E0300, f"unknown parameter `{name}`", span)
            else:
                msg, help_ = message_for(err, model, name)
                cx.add(codes.get(name, Code.E0301), msg, span, help=help_)
        return None
