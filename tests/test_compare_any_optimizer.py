"""`compare` with any optimizer: torch's Muon (with AdamW beside it) and ``module:Class[:{json}]``
specs, end to end on the built-in example; Muon's state bytes by hand, the combined optimizer
against its parts stepped by torch alone, and every bad spec refused before anything is written."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from lowmem.cli.main import main
from lowmem.compare import SpecError, parse_spec, run_file, split_specs
from lowmem.compress.memory import optimizer_state_bytes
from lowmem.compress.optim.combined import Combined, muon_with_adamw
from lowmem.compress.optim.registry import PEERS
from lowmem.examples import shakespeare

HIDDEN = (".attn.", ".mlp.")     # the built-in GPT's hidden matrices, by name


def _by_hand(model) -> tuple[int, int]:
    """(entries of the hidden 2-D matrices, entries of everything else) of the built-in GPT."""
    hidden = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and any(h in n for h in HIDDEN))
    return hidden, sum(p.numel() for p in model.parameters()) - hidden


def _steps(model, opt, n=3):
    for step in range(n):
        opt.zero_grad()
        shakespeare.loss_fn(model, shakespeare.get_batch(step)).backward()
        opt.step()


def test_muon_keeps_one_buffer_for_hidden_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = shakespeare.build_model()
    opt = PEERS["muon"].build(model, 1e-3, (0.9, 0.95), 0.1)
    _steps(model, opt)
    hidden, rest = _by_hand(model)
    assert hidden == 4 * (4 * 128 * 128 + 2 * 4 * 128 * 128)    # 4 layers: q, k, v, out; MLP up and down
    state = optimizer_state_bytes(opt).by_key
    assert state["momentum_buffer"] == 4 * hidden
    assert state["exp_avg"] == state["exp_avg_sq"] == 4 * rest


def test_the_combined_optimizer_steps_exactly_as_its_parts_stepped_alone():
    torch.manual_seed(0)
    model = shakespeare.build_model()
    twin = copy.deepcopy(model)
    opt = muon_with_adamw(model, 3e-3, (0.9, 0.95), 0.1)
    muon_names = {n for n, p in model.named_parameters() if p.dim() == 2 and any(h in n for h in HIDDEN)}
    named = dict(twin.named_parameters())
    muon = torch.optim.Muon([named[n] for n in sorted(muon_names)], lr=3e-3, weight_decay=0.1, momentum=0.95,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for n, p in named.items() if n not in muon_names], lr=3e-3, betas=(0.9, 0.95),
                              weight_decay=0.1)
    _steps(model, opt)
    for step in range(3):
        muon.zero_grad()
        adamw.zero_grad()
        shakespeare.loss_fn(twin, shakespeare.get_batch(step)).backward()
        muon.step()
        adamw.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    assert len(opt.state) == len(list(model.parameters()))
    sd = opt.state_dict()
    again = muon_with_adamw(copy.deepcopy(model), 3e-3, (0.9, 0.95), 0.1)
    again.load_state_dict(sd)
    assert optimizer_state_bytes(again).total == optimizer_state_bytes(opt).total
    with pytest.raises(ValueError, match="in two"):
        p = torch.nn.Parameter(torch.zeros(2, 2))
        Combined([torch.optim.SGD([p], lr=1), torch.optim.SGD([p], lr=1)])


def test_specs_of_classes_keep_their_case_and_canonical_json():
    spec = parse_spec('torch.optim:SGD:{"nesterov": true, "momentum": 0.9}')
    assert spec.custom and str(spec) == 'torch.optim:SGD:{"momentum":0.9,"nesterov":true}'
    assert str(parse_spec("mymod:Lion")) == "mymod:Lion" and str(parse_spec("eve:int8")) == "eve:int8"
    assert split_specs('adamw, torch.optim:SGD:{"momentum": 0.9, "nesterov": true},eve:int8') == \
        ["adamw", 'torch.optim:SGD:{"momentum": 0.9, "nesterov": true}', "eve:int8"]
    # the JSON in a run's file name is a hash of it: no quotes or braces on disk
    path = run_file(__import__("pathlib").Path("out"), str(spec), 1e-3)
    assert path.name.startswith("torch.optim+SGD+") and path.name.endswith("@0.001.json")
    assert not set('{}":,') & set(path.name)
    for bad in ("torch.optim:SGD:[1]", "torch.optim:SGD:{bad json}", "torch.optim:1SGD"):
        with pytest.raises(SpecError):
            parse_spec(bad)


def _compare(capsys, *args):
    try:
        code = main(["compare", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_runs_muon_and_any_class_end_to_end(capsys, tmp_path, monkeypatch):
    # A user's own optimizer in a .py file beside model.py is a module like any other.
    (tmp_path / "mine.py").write_text(
        "import torch\n\nclass Sign(torch.optim.Optimizer):\n"
        "    def __init__(self, params, lr=1e-3):\n        super().__init__(params, {'lr': lr})\n\n"
        "    @torch.no_grad()\n    def step(self, closure=None):\n"
        "        for g in self.param_groups:\n            for p in g['params']:\n"
        "                if p.grad is not None:\n                    p.add_(p.grad.sign(), alpha=-g['lr'])\n")
    (tmp_path / "model.py").write_text("from lowmem.examples.shakespeare import *\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = 'adamw,muon,torch.optim:SGD:{"momentum": 0.9},mine:Sign'
    code, out, err = _compare(capsys, "model.py", "--optimizers", specs, "--lrs", "1e-3", "--steps", 4,
                              "--out", "cmp", "--format", "json")
    assert code == 0, err
    with open(tmp_path / "cmp" / "compare.csv", newline="") as f:
        rows = {r["optimizer"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"adamw", "muon", 'torch.optim:SGD:{"momentum":0.9}', "mine:Sign"}
    assert all(r["status"] == "complete" and int(r["steps_done"]) == 4 for r in rows.values())
    hidden, rest = _by_hand(shakespeare.build_model())
    n = hidden + rest
    assert int(rows["muon"]["state_bytes"]) == 4 * hidden + 2 * 4 * rest          # buffer; AdamW's m and v
    assert int(rows['torch.optim:SGD:{"momentum":0.9}']["state_bytes"]) == 4 * n  # one momentum buffer
    assert int(rows["mine:Sign"]["state_bytes"]) == 0
    assert int(rows["adamw"]["state_bytes"]) == 2 * 4 * n
    doc = json.loads(out)
    assert doc is not None


@pytest.mark.parametrize("spec, words", [
    ("nosuch.module:Foo", "does not import"),
    ("torch.optim:NoSuchThing", "has no 'NoSuchThing'"),
    ("torch.nn:Linear", "is not a torch.optim.Optimizer class"),
    ('torch.optim:SGD:{"momentm": 0.9}', "SGD does not take these arguments"),
    ("torch.optim:SGD:[0.9]", "must be a JSON object"),
])
def test_a_bad_class_spec_is_a_usage_error_before_anything_is_written(capsys, tmp_path, spec, words):
    code, out, err = _compare(capsys, "--example", "shakespeare", "--optimizers", f"adamw,{spec}", "--lrs", "1e-3",
                              "--steps", 2, "--out", tmp_path / "cmp")
    assert code == 2 and out == "" and "Traceback" not in err
    assert words in err
    assert not (tmp_path / "cmp").exists()


def test_compare_steps_every_optimizer_past_a_zero_element_parameter(capsys, tmp_path, monkeypatch):
    # A model with a parameter of 0 elements (a 0-width projection, an empty table) once made
    # Eve, AdaMeM and AdafactorMomentum raise, so `compare` exited 4. Each optimizer now trains
    # the other parameters exactly as it does without it: the same losses, bit for bit.
    (tmp_path / "plain.py").write_text("from lowmem.examples.shakespeare import *\n")
    (tmp_path / "void.py").write_text(
        "import torch\nfrom torch import nn\nfrom lowmem.examples import shakespeare\n"
        "from lowmem.examples.shakespeare import LOWMEM, get_batch, vocab_size\n\n"
        "def build_model():\n    model = shakespeare.build_model()\n"
        "    model.void = nn.Parameter(torch.zeros(3, 0))\n    model.stub = nn.Linear(0, 4, bias=False)\n"
        "    return model\n\n"
        "def loss_fn(model, batch):\n"
        "    return shakespeare.loss_fn(model, batch) + model.void.sum() + model.stub.weight.sum()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = "adamw,eve,adamem,adafactor-momentum,slimadam,adam-mini"
    losses = {}
    for model in ("plain", "void"):
        code, _, err = _compare(capsys, f"{model}.py", "--optimizers", names, "--lrs", "1e-3", "--steps", 3,
                                "--out", f"cmp-{model}")
        assert code == 0, err
        with open(tmp_path / f"cmp-{model}" / "compare.csv", newline="") as f:
            rows = {r["optimizer"]: r for r in csv.DictReader(f)}
        assert set(rows) == set(names.split(","))
        assert all(r["status"] == "complete" and int(r["steps_done"]) == 3 for r in rows.values()), rows
        losses[model] = {name: (r["final_train_loss"], r["final_val_loss"]) for name, r in rows.items()}
    assert all(float(train) > 0 and float(val) > 0 for train, val in losses["plain"].values())
    assert losses["void"] == losses["plain"]
