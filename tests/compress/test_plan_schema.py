"""Plan: savings against hand arithmetic, JSON round trip, corrupt files, validation against a model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowmem.compress import Plan, PlanError, PlanMismatchError, format_bytes, plan_state_memory, slimadam_rules
from lowmem.compress.plan import LayerPlan, PartPlan, model_fingerprint, model_shapes


class Attn(nn.Module):
    def __init__(self, d, h, fused):
        super().__init__()
        self.n_head = h
        if fused:
            self.c_attn = nn.Linear(d, 3 * d, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.c_proj = nn.Linear(d, d, bias=False)


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_proj = nn.Linear(4 * d, d, bias=False)


class Block(nn.Module):
    def __init__(self, d, h, fused):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.attn = Attn(d, h, fused)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.mlp = MLP(d)


class GPT(nn.Module):
    """nanoGPT's GPT-2: no biases, tied head; separate or fused q/k/v."""

    def __init__(self, vocab=50304, block=1024, n_layer=12, n_head=12, d=768, fused=False):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block, d),
            h=nn.ModuleList([Block(d, n_head, fused) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(d, bias=False)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight


def gpt2_124m(**kw):
    with torch.device("meta"):
        return GPT(**kw)


def test_slimadam_rules_on_gpt2_124m_keep_153472_of_124373760():
    plan = slimadam_rules(gpt2_124m())
    # Hand arithmetic: wte (50304 tokens, one per token) + wpe (1024) + ln_f 768
    # + 12 blocks × [q 768 + k 768 (fan_in: one per row) + v 768 + c_proj 768 (fan_out: one per column)
    #                + c_fc 768 (3072×768 over fan_out) + mlp c_proj 3072 (768×3072 over fan_out) + 2 norms × 768]
    per_block = 768 * 4 + 768 + 3072 + 2 * 768
    assert plan.summary["v_kept"] == 50304 + 1024 + 768 + 12 * per_block == 153_472
    # All parameters: 50304·768 + 1024·768 + 12·(4·768² + 2·768·3072 + 2·768) + 768
    assert plan.summary["v_full"] == 50304 * 768 + 1024 * 768 + 12 * (4 * 768**2 + 2 * 768 * 3072 + 2 * 768) + 768
    assert plan.summary["v_full"] == 124_373_760
    lp = plan.layers
    assert lp["transformer.h.0.attn.q.weight"].reduce == [1] and lp["transformer.h.0.attn.q.weight"].v_kept == 768
    assert lp["transformer.h.0.attn.v.weight"].reduce == [0]
    assert lp["transformer.h.0.mlp.c_fc.weight"].v_kept == 768
    assert lp["transformer.h.0.mlp.c_proj.weight"].v_kept == 3072
    assert lp["transformer.wte.weight"].aliases == ["lm_head.weight"]
    assert lp["transformer.h.0.ln_1.weight"].reduce is None


def test_slimadam_rules_on_fused_c_attn_give_each_part_its_rule():
    plan = slimadam_rules(gpt2_124m(fused=True, n_layer=1))
    c_attn = plan.layers["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.reduce is None
    assert [(p.name, p.start, p.stop, p.reduce) for p in c_attn.parts] == [
        ("q", 0, 768, [1]), ("k", 768, 1536, [1]), ("v", 1536, 2304, [0])]
    # q and k keep one per row (768 each), v one per column (768).
    assert c_attn.v_kept == 3 * 768


def test_parts_must_tile_the_sliced_dim():
    bad = LayerPlan([6, 2], "attn_qkv", [6, 2], None, parts=[
        PartPlan("q", 0, 0, 2, [2, 2], [1]), PartPlan("k", 0, 3, 6, [3, 2], [1])])
    with pytest.raises(PlanError, match="does not continue at 2"):
        bad.check("c_attn.weight")


def test_json_round_trip_and_atomic_save(tmp_path):
    model = GPT(vocab=50, block=8, n_layer=2, n_head=2, d=8)
    plan = slimadam_rules(model)
    path = plan.save(tmp_path / "plan.json")
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]     # no temporary left behind
    again = Plan.load(path)
    assert again.to_json() == plan.to_json()
    doc = json.loads(path.read_text())
    assert doc["schema"] == "lowmem.plan/1"
    assert doc["summary"] == plan.summary
    again.validate(model)


def test_nan_snr_is_written_as_null_not_nan(tmp_path):
    plan = Plan({"class": "X", "parameters": 4, "fingerprint": "sha256:0"},
                {"w": LayerPlan([2, 2], "other", [2, 2], None, "x", {"0": float("nan"), "1": 2.0})})
    text = plan.dumps()
    assert "NaN" not in text and json.loads(text)["layers"]["w"]["snr"] == {"0": None, "1": 2.0}


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t[: len(t) // 2], r"line \d+ column \d+"),
    (lambda t: t.replace('"lowmem.plan/1"', '"lowmem.plan/9"'), "schema"),
    (lambda t: json.dumps({**json.loads(t), "layers": {"w.weight": {"shape": [2], "role": "bias", "view": [2]}}}),
     r"layers\['w.weight'\]: missing key 'reduce'"),
    (lambda t: json.dumps({**json.loads(t), "layers": {"w.weight": {"shape": [2, 3], "role": "other", "view": [5], "reduce": None}}}),
     r"'w.weight': view \[5\] has 5 entries"),
    (lambda t: json.dumps({**json.loads(t), "layers": {"w.weight": {"shape": [2, 3], "role": "other", "view": [2, 3], "reduce": [2]}}}),
     r"'w.weight': reduce \[2\]"),
])
def test_corrupt_plan_files_say_where(tmp_path, mutate, message):
    path = slimadam_rules(GPT(vocab=50, block=8, n_layer=1, n_head=2, d=8)).save(tmp_path / "plan.json")
    path.write_text(mutate(path.read_text()))
    with pytest.raises(PlanError, match=message) as err:
        Plan.load(path)
    assert str(path) in str(err.value)


def test_plan_for_another_model_names_the_differing_parameters():
    small = GPT(vocab=50, block=8, n_layer=1, n_head=2, d=8)
    other = GPT(vocab=60, block=8, n_layer=2, n_head=2, d=8)
    plan = slimadam_rules(small)
    with pytest.raises(PlanMismatchError) as err:
        plan.validate(other)
    msg = str(err.value)
    assert "transformer.wte.weight (plan [50, 8], model [60, 8])" in msg
    assert "in the model, not in the plan: transformer.h.1.ln_1.weight" in msg


class Wrapped(nn.Module):
    def __init__(self, inner, attr):
        super().__init__()
        setattr(self, attr, inner)


@pytest.mark.parametrize("attr", ["_orig_mod", "module"])
def test_compile_and_ddp_prefixes_are_normalised(attr):
    model = GPT(vocab=50, block=8, n_layer=1, n_head=2, d=8)
    plan = slimadam_rules(model)
    wrapped = Wrapped(model, attr)
    assert next(n for n, _ in wrapped.named_parameters()).startswith(attr + ".")
    plan.validate(wrapped)
    assert slimadam_rules(wrapped).model["fingerprint"] == plan.model["fingerprint"]


def test_fingerprint_hashes_ordered_names_and_shapes():
    a = GPT(vocab=50, block=8, n_layer=1, n_head=2, d=8)
    b = GPT(vocab=50, block=8, n_layer=1, n_head=2, d=8)
    c = GPT(vocab=51, block=8, n_layer=1, n_head=2, d=8)
    assert model_fingerprint(model_shapes(a)) == model_fingerprint(model_shapes(b))
    assert model_fingerprint(model_shapes(a)) != model_fingerprint(model_shapes(c))
    assert model_fingerprint([("a", (1,)), ("b", (2,))]) != model_fingerprint([("b", (2,)), ("a", (1,))])


def test_state_memory_by_hand():
    plan = slimadam_rules(gpt2_124m())
    mem = plan_state_memory(plan)
    assert mem.adamw_bytes == 2 * 4 * 124_373_760
    assert mem.plan_bytes == 4 * (124_373_760 + 153_472)
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(3 * 2**20) == "3.00 MiB" and format_bytes(12) == "12 B"
