"""Fixtures over the optimizer registry of optim_cases.py (one test per registry entry)."""

from __future__ import annotations

import pytest

from optim_cases import OPTIMIZERS, PLAN_OPTIMIZERS, OptimInfo


@pytest.fixture(params=OPTIMIZERS, ids=lambda i: i.name)
def optim_info(request) -> OptimInfo:
    return request.param


@pytest.fixture(params=PLAN_OPTIMIZERS, ids=lambda i: i.name)
def plan_info(request) -> OptimInfo:
    return request.param
