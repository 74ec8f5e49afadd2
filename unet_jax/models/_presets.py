"""The one way every family builds a model from a named preset (a keyword set)."""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["FIELD_RULES", "check_fields", "from_preset"]


def _integer(low: int) -> tuple[Callable[[Any], bool], str]:
    return (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
        "a positive integer" if low == 1 else f"an integer >= {low}",
    )


def _number(test: Callable[[float], bool], text: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and test(v), text)


# The rules a field of that name obeys in every model that has it: (test, expected).
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{
        name: _integer(1)
        for name in ("features", "depth", "convs_per_block", "kernel_size", "up_kernel", "in_channels", "num_classes")
    },
    "class_head": _integer(0),
    "dropout_rate": _number(lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "bn_momentum": _number(lambda v: 0 <= v <= 1, "a number in [0, 1] (the running average's decay)"),
    "bn_epsilon": _number(lambda v: v > 0, "a positive number"),
}


def check_fields(cls: type, values: Mapping[str, Any]) -> None:
    """Check a model's field values before it is built: the shared :data:`FIELD_RULES`, the
    choices of every ``Literal`` field, then the class's own ``check_fields(values)``
    (constraints between fields). A ValueError names the field (``model.depth = 0: ...``)."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        rule = FIELD_RULES.get(name)
        if rule is not None and not rule[0](value):
            raise ValueError(f"model.{name} = {value!r}: expected {rule[1]} ({cls.__name__})")
        hint = hints.get(name)
        if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            raise ValueError(
                f"model.{name} = {value!r}: expected one of {list(typing.get_args(hint))} ({cls.__name__})"
            )
    own = getattr(cls, "check_fields", None)
    if own is not None:
        own(values)


def from_preset(
    family: str, presets: Mapping[str, Any], name: str, overrides: Mapping[str, Any], cls: type | None = None
) -> Any:
    """``cls(**{**presets[name], **overrides})``; an entry may also be ``(cls, keywords)``.

    An unknown name is a ``ValueError`` listing the family's presets; an unknown field one
    naming the class, the fields and the preset; a bad value one naming the field
    (:func:`check_fields`).
    """
    if name not in presets:
        label = f"{family} preset" if family else "preset"
        raise ValueError(f"unknown {label} {name!r}; expected one of {sorted(presets)}")
    entry = presets[name]
    if isinstance(entry, tuple):
        cls, keywords = entry
    else:
        keywords = entry
    assert cls is not None, f"preset {name!r} names no class"
    unknown = set(overrides) - set(cls.__dataclass_fields__) - {"parent", "name"}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)} for preset {name!r}")
    values = {**keywords, **overrides}
    defaults = {f: d.default for f, d in cls.__dataclass_fields__.items() if f not in ("parent", "name")}
    check_fields(cls, {**{k: v for k, v in defaults.items() if isinstance(v, (int, float, str))}, **values})
    return cls(**values)
