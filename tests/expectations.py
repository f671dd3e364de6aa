"""Shared by the tests that check what lowmem reads every parameter as (test_architectures,
test_moe, test_vision_models): each name matched by exactly one hand-written pattern."""

from __future__ import annotations

import re


def check_every(got: list[tuple[str, tuple]], expected: list[tuple], what: str = "") -> None:
    """`got`: (name, facts) for every parameter; `expected`: (pattern, *facts) rows. Each name is
    matched (``re.fullmatch``) by exactly one row whose facts it has, and every row matches a name."""
    used = set()
    for name, facts in got:
        hits = [i for i, (pattern, *_) in enumerate(expected) if re.fullmatch(pattern, name)]
        assert len(hits) == 1, f"{what}{name} matches {len(hits)} expectations"
        assert tuple(facts) == tuple(expected[hits[0]][1:]), f"{what}{name}: {facts}"
        used.add(hits[0])
    assert used == set(range(len(expected))), f"{what}expectations that match nothing"
