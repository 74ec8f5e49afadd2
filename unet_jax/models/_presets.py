"""The one way every family builds a model from a named preset (a keyword set)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["from_preset"]


def from_preset(family: str, presets: Mapping[str, Any], name: str, overrides: Mapping[str, Any],
                cls: type | None = None) -> Any:
    """``cls(**{**presets[name], **overrides})``; an entry may also be ``(cls, keywords)``.

    An unknown name is a ``ValueError`` listing the family's presets; an unknown field one
    naming the class, the fields and the preset.
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
    return cls(**{**keywords, **overrides})
