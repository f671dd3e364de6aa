"""The optimizer registry is the one list: the README's table, compare's names, the CLI's
presets, memory's rows and the builders' presets all agree with it, and every entry builds
from the settings compare passes and takes a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem.cli.main import make_parser
from lowmem.compare import OPTIMIZERS, SweepSettings, make_optimizer
from lowmem.compress import PRESETS, estimate_state_memory
from lowmem.compress.optim import registry

from optim_cases import tiny_loss, tiny_model

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_table_is_the_registry():
    assert registry.markdown_table() in README.read_text()


def test_every_name_comes_from_the_registry():
    assert OPTIMIZERS == registry.NAMES == tuple(registry.REGISTRY)
    assert sorted(registry.PLAN_PRESETS) == sorted(PRESETS)
    preset_choices = next(a.choices for a in make_parser()._actions if "--preset" in a.option_strings)
    assert list(preset_choices) == list(registry.PLAN_PRESETS)
    rows = [r.name for r in estimate_state_memory(tiny_model()).rows]
    assert rows == list(registry.NAMES)


def test_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="known: adamw, slimadam"):
        registry.entry("adam")


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_entry_builds_from_compare_settings_and_steps(name):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(name, model, 1e-2, SweepSettings(steps=2, weight_decay=0.1))
    assert isinstance(opt, registry.REGISTRY[name].cls)
    tiny_loss(model, 0).backward()
    opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(moved), f"{name}: some parameters did not move"


def test_readme_peer_table_is_the_registry():
    assert registry.peer_markdown_table() in README.read_text()


@pytest.mark.parametrize("name", registry.PEER_NAMES)
def test_every_peer_builds_from_compare_settings_and_steps(name):
    peer = registry.PEERS[name]
    if peer.unavailable():
        pytest.skip(peer.unavailable())
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(name, model, 1e-2, SweepSettings(steps=2, weight_decay=0.1))
    parts = getattr(opt, "parts", [opt])     # Muon: torch's Muon and AdamW, stepped as one
    assert any(type(o).__name__ == peer.attr and type(o).__module__.startswith(peer.module.split(".")[0])
               for o in parts)
    adam = [g for g in opt.param_groups if "betas" in g]
    assert adam and all(g["betas"] == (0.9, 0.95) for g in adam)
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)
    tiny_loss(model, 0).backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
