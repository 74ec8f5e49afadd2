"""The one key-set comparison (unet_jax._keys), on literal key -> shape maps."""

from __future__ import annotations

from unet_jax._keys import key_problems


def test_agreeing_maps_have_no_problems():
    assert key_problems({"a": (2, 3), "b": ()}, {"b": (), "a": (2, 3)}) == []


def test_every_kind_of_difference_is_named_sorted():
    found = {"b": (1,), "z": (2,), "y": (3,), "c": (4, 4)}
    expected = {"a": (1,), "b": (1,), "c": (4, 5), "d": ()}
    assert key_problems(found, expected) == [
        "2 missing key(s): a, d",
        "2 unexpected key(s): y, z",
        "1 shape mismatch(es) (expected vs found): c: expected (4, 5), found (4, 4)",
    ]


def test_ignore_fits_and_limit():
    found = {"k.tracked": (), "s": (8, 1), "m1": (), "m2": ()}
    expected = {"s": (8, 3), "x1": (), "x2": (), "x3": ()}
    problems = key_problems(
        found,
        expected,
        ignore=lambda k: k.endswith(".tracked"),
        fits=lambda k, shape, want: k == "s" and shape[0] == want[0],
        limit=2,
    )
    assert problems == ["3 missing key(s): x1, x2, ... and 1 more", "2 unexpected key(s): m1, m2"]
