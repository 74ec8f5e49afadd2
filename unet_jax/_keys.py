"""The one key-set comparison: what a checkpoint, an exported model or a converted PyTorch
state dict holds against what the model expects, every difference named in one message."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["MAX_LISTED", "key_problems"]

MAX_LISTED = 20  # keys named per kind of difference; the rest counted


def _listed(items: Sequence[str], limit: int, sep: str = ", ") -> str:
    more = len(items) - limit
    return sep.join(items[:limit]) + (f"{sep}... and {more} more" if more > 0 else "")


def key_problems(
    found: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    ignore: Callable[[str], bool] = lambda key: False,
    fits: Callable[[str, Any, Any], bool] = lambda key, shape, want: shape == want,
    limit: int = MAX_LISTED,
) -> list[str]:
    """The differences between two ``key -> shape`` maps, one phrase per kind (none: an
    empty list):

    * ``"N missing key(s): a, b"``: keys of ``expected`` that ``found`` lacks;
    * ``"N unexpected key(s): ..."``: keys of ``found`` that ``expected`` lacks (except those
      ``ignore(key)`` accepts);
    * ``"N shape mismatch(es) (expected vs found): k: expected S, found T; ..."``: keys of
      both where ``fits(key, found_shape, expected_shape)`` is false (default: equal).

    Keys are sorted; at most ``limit`` named per phrase, then ``... and M more``.
    """
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not ignore(k))
    mismatched = sorted(
        f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
        for k in expected
        if k in found and not fits(k, tuple(found[k]), tuple(expected[k]))
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing, limit)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected, limit)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (expected vs found): {_listed(mismatched, limit, '; ')}")
    return problems
