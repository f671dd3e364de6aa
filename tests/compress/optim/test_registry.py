"""The optimizer registry is the one list: the README's table, compare's names, the CLI's
presets, memory's rows and the builders' presets all agree with it, and every entry builds
from the settings compare passes and takes a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem.cli.main import make_parser
from lowmem.compare import OPTIMIZERS, SweepSettings, make_optimizer
from lowmem.compress import PRESETS, builders, estimate_state_memory
from lowmem.compress.optim import registry
from lowmem.compress.optim.engine import ReducedAdamW
from lowmem.layers import resolve_layers

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


def test_a_new_v_averaging_optimizer_is_a_preset_and_an_entry(monkeypatch):
    # What a newcomer adds: a preset's rules in lowmem.compress.builders and an entry whose class
    # is the engine itself. Here the new preset repeats Eve's rules under a new name, so the
    # optimizer the entry builds must step exactly as Eve, and count Eve's state.
    monkeypatch.setitem(builders._ROLE_RULES, "rows-again", builders._ROLE_RULES["eve"])
    new = registry.OptimizerEntry("rows-again", ReducedAdamW, "one v per output row", "none",
                                  registry._preset_count("rows-again"), preset="rows-again")
    eve = registry.entry("eve")
    models = [tiny_model(), tiny_model()]
    opts = [e.build(m, 1e-2, (0.9, 0.99), 0.1) for e, m in zip((new, eve), models)]
    assert type(opts[0]) is ReducedAdamW
    for step in range(3):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            tiny_loss(model, step).backward()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
    layers = resolve_layers(models[0], warn=False)
    assert new.count(models[0], layers) == eve.count(models[0], layers)
    assert new.count(models[0], layers).v < eve.count(models[0], layers).m   # v averaged, not full
    # every builder of an entry's optimizer takes its preset: the Hugging Face integration too
    pytest.importorskip("transformers")
    from lowmem.integrations.hf import optimizer_cls_and_kwargs
    monkeypatch.setitem(registry.REGISTRY, "rows-again", new)
    cls, kwargs = optimizer_cls_and_kwargs(models[0], "rows-again", lr=1e-2)
    hf = cls(**kwargs)
    assert [lp.reduce for lp in hf.plan.layers.values()] == [lp.reduce for lp in opts[1].plan.layers.values()]


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
