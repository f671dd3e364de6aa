"""Plan: the published rules on GPT-2 124M against hand arithmetic, fused parts, JSON, corrupt files,
validation against a model, and the optimizer-state memory a plan implies."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from lowmem.compress import (LayerPlan, PartPlan, Plan, PlanError, PlanMismatchError, format_bytes,
                             model_fingerprint, plan_state_memory, slimadam_rules)
from lowmem.compress.plan import model_shapes
from lowmem.snr.keys import SnrKey

# -- nanoGPT's GPT-2 (no biases, LayerNorm weights only, head tied to wte) -----------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, fused):
        super().__init__()
        self.n_head = n_head
        if fused:
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)     # (3C, C)
        else:
            self.q = nn.Linear(n_embd, n_embd, bias=False)              # (C, C)
            self.k = nn.Linear(n_embd, n_embd, bias=False)
            self.v = nn.Linear(n_embd, n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)          # (4C, C)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)        # (C, 4C)


class Block(nn.Module):
    def __init__(self, n_embd, n_head, fused):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = CausalSelfAttention(n_embd, n_head, fused)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = MLP(n_embd)


class GPT(nn.Module):
    def __init__(self, vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                 fused=False, tied=True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head, fused) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd, bias=False),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tied:
            self.transformer.wte.weight = self.lm_head.weight


def gpt2_124m(**kw) -> GPT:
    with torch.device("meta"):
        return GPT(**kw)


def tiny(**kw) -> GPT:
    """A CPU GPT small enough to save and load: vocab 50, block 8, width 8, 2 heads."""
    args = dict(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=8)
    return GPT(**{**args, **kw})


class Wrapper(nn.Module):
    """Stands in for torch.compile (`_orig_mod`) or DDP (`module`): the model is a child attribute."""

    def __init__(self, inner: nn.Module, attr: str):
        super().__init__()
        setattr(self, attr, inner)


H0 = "transformer.h.0."

# Hand arithmetic, GPT-2 124M, C = 768, vocab 50304, block 1024, 12 layers:
#   v_full = wte 50304·768 + wpe 1024·768 + ln_f 768
#            + 12 · (q, k, v, attn c_proj: 4·768² + c_fc, mlp c_proj: 2·3072·768 + ln_1, ln_2: 2·768)
#          = 38,633,472 + 786,432 + 768 + 12 · (2,359,296 + 4,718,592 + 1,536) = 124,373,760
#   v_kept = wte 50304 (one per token) + wpe 1024 (one per position) + ln_f 768 (full)
#            + 12 · (q 768 + k 768 (one per output row) + v 768 + attn c_proj 768 (one per input column)
#                    + c_fc 768 (one per input column) + mlp c_proj 3072 (one per input column)
#                    + ln_1 768 + ln_2 768)
#          = 52,096 + 12 · 8,448 = 153,472
V_FULL_124M = 124_373_760
V_KEPT_124M = 153_472


# -- the published rules on GPT-2 124M ----------------------------------------------------------

def test_slimadam_rules_keep_153472_of_124373760_v_entries_on_gpt2_124m():
    plan = slimadam_rules(gpt2_124m())
    assert plan.summary["v_full"] == V_FULL_124M
    assert plan.summary["v_kept"] == V_KEPT_124M
    # 1 - 153,472 / 124,373,760 = 0.998766… : the paper's "99.88% saved".
    assert plan.summary["v_saved"] == pytest.approx(0.998766, abs=1e-6)
    assert plan.model["parameters"] == V_FULL_124M and plan.model["class"] == "GPT"


@pytest.mark.parametrize("name, reduce, kept", [
    (H0 + "attn.q.weight", [1], 768),           # (768, 768) over fan_in: one per output row
    (H0 + "attn.k.weight", [1], 768),
    (H0 + "attn.v.weight", [0], 768),           # over fan_out: one per input column
    (H0 + "attn.c_proj.weight", [0], 768),
    (H0 + "mlp.c_fc.weight", [0], 768),         # (3072, 768) over fan_out: one per input column
    (H0 + "mlp.c_proj.weight", [0], 3072),      # (768, 3072) over fan_out: one per input column
    (H0 + "ln_1.weight", None, 768),            # norms: full Adam
    ("transformer.h.11.ln_2.weight", None, 768),
    ("transformer.ln_f.weight", None, 768),
    ("transformer.wte.weight", [1], 50304),     # over the model dim: one per token
    ("transformer.wpe.weight", [1], 1024),      # one per position
])
def test_slimadam_rules_per_role_kept_counts_on_gpt2_124m(name, reduce, kept):
    lp = slimadam_rules(gpt2_124m()).layers[name]
    assert lp.reduce == reduce
    assert lp.v_kept == kept


def test_tied_lm_head_is_one_layer_with_an_alias_and_counted_once():
    plan = slimadam_rules(gpt2_124m())
    assert "lm_head.weight" not in plan.layers
    assert plan.layers["transformer.wte.weight"].aliases == ["lm_head.weight"]
    # wte, wpe, ln_f + 12 blocks × 8 parameters
    assert len(plan.layers) == 3 + 12 * 8


def test_untied_lm_head_keeps_one_v_per_vocabulary_row():
    plan = slimadam_rules(gpt2_124m(tied=False))
    lp = plan.layers["lm_head.weight"]
    assert (lp.shape, lp.reduce, lp.v_kept) == ([50304, 768], [1], 50304)
    assert plan.summary["v_full"] == V_FULL_124M + 50304 * 768
    assert plan.summary["v_kept"] == V_KEPT_124M + 50304


# -- fused c_attn ---------------------------------------------------------------------------------

def test_slimadam_rules_on_fused_c_attn_give_q_k_fan_in_and_v_fan_out():
    plan = slimadam_rules(gpt2_124m(fused=True))
    lp = plan.layers[H0 + "attn.c_attn.weight"]
    assert lp.shape == [2304, 768] and lp.reduce is None
    assert [(p.name, p.dim, p.start, p.stop, p.view, p.reduce) for p in lp.parts] == [
        ("q", 0, 0, 768, [768, 768], [1]),
        ("k", 0, 768, 1536, [768, 768], [1]),
        ("v", 0, 1536, 2304, [768, 768], [0]),
    ]
    # q 768 rows + k 768 rows + v 768 columns
    assert lp.v_kept == 2304
    # A fused c_attn holds exactly the entries of q, k and v, and keeps as many: totals unchanged.
    assert plan.summary["v_full"] == V_FULL_124M
    assert plan.summary["v_kept"] == V_KEPT_124M


def _qkv(parts) -> LayerPlan:
    """A (6, 2) fused projection: rows 0..5 split into parts given as (name, dim, start, stop, view)."""
    return LayerPlan([6, 2], "attn_qkv", [6, 2], None, "x",
                     parts=[PartPlan(n, d, a, b, v, [len(v) - 1]) for n, d, a, b, v in parts])


def test_check_accepts_parts_that_tile_the_dim():
    _qkv([("q", 0, 0, 2, [2, 2]), ("k", 0, 2, 4, [2, 2]), ("v", 0, 4, 6, [2, 2])]).check("c_attn.weight")


@pytest.mark.parametrize("parts, message", [
    ([("q", 0, 0, 2, [2, 2]), ("k", 0, 3, 6, [3, 2])], r"part 'k' \[3, 6\) does not continue at 2"),    # gap
    ([("q", 0, 0, 3, [3, 2]), ("k", 0, 2, 6, [4, 2])], r"part 'k' \[2, 6\) does not continue at 3"),    # overlap
    ([("q", 0, 0, 2, [2, 2]), ("k", 0, 2, 4, [2, 2])], r"parts cover 4 of 6 along dim 0"),             # short
    ([("q", 0, 0, 2, [2, 2]), ("k", 1, 0, 2, [6, 2])], r"parts must slice one dim"),
    ([("q", 0, 0, 3, [3, 2]), ("k", 0, 3, 6, [5])], r"part 'k' view \[5\] has 5 entries, the slice has 6"),
])
def test_check_rejects_parts_that_do_not_tile_the_dim(parts, message):
    with pytest.raises(PlanError, match=message) as err:
        _qkv(parts).check("h.0.attn.c_attn.weight")
    assert "'h.0.attn.c_attn.weight'" in str(err.value)


def test_check_rejects_a_layer_with_parts_and_its_own_reduce():
    lp = _qkv([("q", 0, 0, 6, [6, 2])])
    lp.reduce = [0]
    with pytest.raises(PlanError, match="reduce null"):
        lp.check("c_attn.weight")


# -- JSON -----------------------------------------------------------------------------------------

def _keys(snr: dict) -> dict:
    """An SNR record written as plan.json keys it."""
    return {SnrKey.parse(k): v for k, v in snr.items()}


def _rich_plan() -> Plan:
    """A plan with every field: parts with SNR, aliases, non-finite SNR, a compressed and a full layer."""
    qkv = LayerPlan([6, 2], "attn_qkv", [6, 2], None, "per part",
                    _keys({"q:1": 2.5, "k:0": float("nan")}),
                    [PartPlan("q", 0, 0, 2, [2, 2], [1], "q why", _keys({"q:1": 2.5})),
                     PartPlan("k", 0, 2, 4, [2, 2], None, "k why", _keys({"k:0": float("inf")})),
                     PartPlan("v", 0, 4, 6, [1, 2, 2], [1, 2], "v why")])
    layers = {
        "emb.weight": LayerPlan([5, 2], "embedding", [5, 2], [1], "SNR along model 3.00 > 1",
                                _keys({"0": 0.1, "1": 3.0, "0,1": float("-inf")}), aliases=["head.weight"]),
        "attn.c_attn.weight": qkv,
        "ln.weight": LayerPlan([2], "norm", [2], None, "norms keep full Adam"),
    }
    return Plan({"class": "Net", "parameters": 24, "fingerprint": "sha256:ab"}, layers,
                {"method": "snr", "threshold": 1.0, "window": [10, 30]})


def test_dumps_then_loads_gives_the_same_json():
    plan = _rich_plan()
    again = Plan.loads(plan.dumps())
    assert again.to_json() == plan.to_json()
    assert again.dumps() == plan.dumps()


def test_summary_numbers_are_in_the_json():
    doc = json.loads(_rich_plan().dumps())
    # emb 10 entries keep 5; c_attn 12 keep q 2 + k 4 + v 1; ln 2 keep 2 -> 24 entries keep 14.
    assert doc["summary"] == {"v_full": 24, "v_kept": 14, "v_saved": pytest.approx(10 / 24, abs=1e-6)}
    assert doc["schema"] == "lowmem.plan/2"
    assert doc["layers"]["emb.weight"]["aliases"] == ["head.weight"]


def _no_constants(name):
    raise AssertionError(f"JSON contains {name}")


def test_non_finite_snr_is_written_as_null_never_nan_or_infinity():
    text = _rich_plan().dumps()
    doc = json.loads(text, parse_constant=_no_constants)     # strict JSON: NaN/Infinity would raise
    assert doc["layers"]["emb.weight"]["snr"] == {"0": 0.1, "1": 3.0, "0,1": None}
    assert doc["layers"]["attn.c_attn.weight"]["snr"] == {"q:1": 2.5, "k:0": None}
    assert doc["layers"]["attn.c_attn.weight"]["parts"][1]["snr"] == {"k:0": None}


def test_a_nan_outside_the_snr_is_refused_not_written(tmp_path):
    plan = _rich_plan()
    plan.source["probe_lr"] = float("nan")
    with pytest.raises(ValueError):
        plan.save(tmp_path / "plan.json")
    assert list(tmp_path.iterdir()) == []


def test_save_writes_atomically_and_replaces_an_old_file(tmp_path):
    path = tmp_path / "plans" / "plan.json"
    path.parent.mkdir()
    path.write_text("old")
    plan = slimadam_rules(tiny())
    assert plan.save(path) == path
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]      # no temporary left
    doc = json.loads(path.read_text())
    assert doc == plan.to_json()
    # tiny: wte 50·8 + wpe 8·8 + ln_f 8 + 2 · (4·64 + 2·32·8 + 2·8) = 400 + 64 + 8 + 2·784 = 2040
    # kept: wte 50 + wpe 8 + ln_f 8 + 2 · (q 8 + k 8 + v 8 + c_proj 8 + c_fc 8 + mlp c_proj 32 + 16) = 66 + 176
    assert doc["summary"]["v_full"] == 2040
    assert doc["summary"]["v_kept"] == 242


def test_save_that_fails_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "plan.json"
    target.mkdir()                       # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        slimadam_rules(tiny()).save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert target.is_dir() and list(target.iterdir()) == []


# -- corrupt plan files -------------------------------------------------------------------------

def _saved(tmp_path) -> tuple[os.PathLike, dict]:
    path = slimadam_rules(tiny(n_layer=1)).save(tmp_path / "plan.json")
    return path, json.loads(path.read_text())


def _load_error(path) -> str:
    with pytest.raises(PlanError) as err:
        Plan.load(path)
    assert str(path) in str(err.value)
    return str(err.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "plan.json"
    # Line 3 is `  "model": {,}`: two spaces, `"model":` (8), a space, `{` at column 12, `,` at 13.
    path.write_text('{\n  "schema": "lowmem.plan/1",\n  "model": {,}\n}\n')
    assert "line 3 column 13" in _load_error(path)


def test_truncated_plan_file_reports_a_line(tmp_path):
    path, _ = _saved(tmp_path)
    path.write_text(path.read_text()[:200])
    assert "line " in _load_error(path)


def test_empty_plan_file_reports_line_1_column_1(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("")
    assert "line 1 column 1" in _load_error(path)


@pytest.mark.parametrize("doc, words", [
    ({"schema": "lowmem.plan/3"}, ["schema", "'lowmem.plan/3'", "'lowmem.plan/2'", "'lowmem.plan/1'"]),
    ({"model": {}, "layers": {}}, ["schema", "None"]),
    ([1, 2], ["expected a JSON object", "list"]),
    ({"schema": "lowmem.plan/1", "model": {}, "layers": []}, ['"layers" must be a JSON object']),
    ({"schema": "lowmem.plan/1", "model": "GPT", "layers": {}}, ['"model" must be a JSON object']),
])
def test_wrong_schema_is_a_plan_error_with_the_file(tmp_path, doc, words):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    msg = _load_error(path)
    for w in words:
        assert w in msg


LAYER = "transformer.h.0.mlp.c_fc.weight"        # (32, 8) in `tiny`


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.pop("reduce"), [LAYER, "missing key 'reduce'"]),
    (lambda d: d.pop("shape"), [LAYER, "missing key 'shape'"]),
    (lambda d: d.update(view=[32, 9]), [LAYER, "view [32, 9] has 288 entries", "shape [32, 8] has 256"]),
    (lambda d: d.update(view=[4, 8, 4]), [LAYER, "view [4, 8, 4] has 128 entries"]),
    (lambda d: d.update(reduce=[2]), [LAYER, "reduce [2] is not a set of dims of view [32, 8]"]),
    (lambda d: d.update(reduce=[-1]), [LAYER, "reduce [-1]"]),
    (lambda d: d.update(reduce=[0, 0]), [LAYER, "reduce [0, 0]"]),
    (lambda d: d.update(reduce=1), [LAYER]),
    (lambda d: d.update(shape=None), [LAYER]),
    (lambda d: d.update(snr={"0": "high"}), [LAYER]),
    (lambda d: d.update(snr={"fan_in": 1.0}), [LAYER, "SNR key 'fan_in' is not dims"]),
    (lambda d: d.update(snr={"heads:0;1": 1.0}), [LAYER, "SNR key 'heads:0;1'"]),
])
def test_a_bad_layer_entry_names_the_layer(tmp_path, edit, words):
    path, doc = _saved(tmp_path)
    edit(doc["layers"][LAYER])
    path.write_text(json.dumps(doc, indent=2))
    msg = _load_error(path)
    for w in words:
        assert w in msg


@pytest.mark.parametrize("entry", [[32, 8], "c_fc", None, 7])
def test_a_layer_entry_that_is_not_an_object_names_the_layer(tmp_path, entry):
    path, doc = _saved(tmp_path)
    doc["layers"][LAYER] = entry
    path.write_text(json.dumps(doc))
    assert LAYER in _load_error(path)


def test_an_infinite_shape_names_the_layer(tmp_path):
    path, doc = _saved(tmp_path)
    text = json.dumps(doc).replace('"shape": [32, 8]', '"shape": [Infinity, 8]')
    assert "Infinity" in text
    path.write_text(text)
    assert LAYER in _load_error(path)


def test_parts_in_a_file_that_do_not_tile_name_the_layer(tmp_path):
    path = slimadam_rules(tiny(n_layer=1, fused=True)).save(tmp_path / "plan.json")
    doc = json.loads(path.read_text())
    name = "transformer.h.0.attn.c_attn.weight"                  # (24, 8): q [0, 8), k [8, 16), v [16, 24)
    doc["layers"][name]["parts"][2]["start"] = 17
    path.write_text(json.dumps(doc))
    msg = _load_error(path)
    assert name in msg and "part 'v' [17, 24) does not continue at 16" in msg


def test_a_part_reduce_out_of_range_names_the_layer(tmp_path):
    path = slimadam_rules(tiny(n_layer=1, fused=True)).save(tmp_path / "plan.json")
    doc = json.loads(path.read_text())
    name = "transformer.h.0.attn.c_attn.weight"
    doc["layers"][name]["parts"][0]["reduce"] = [3]
    path.write_text(json.dumps(doc))
    msg = _load_error(path)
    assert name in msg and "part 'q' reduce [3]" in msg


@pytest.mark.parametrize("edit, words", [
    # a JSON float is not a size, however large or round
    (lambda d: d.update(shape=[1e30, 8]), ['"shape" must be a list of integers', "[1e+30, 8]"]),
    (lambda d: d.update(view=[32.0, 8]), ['"view" must be a list of integers', "[32.0, 8]"]),
    (lambda d: d.update(shape=[True, 8]), ['"shape" must be a list of integers', "[true, 8]"]),
    (lambda d: d.update(shape="32x8"), ['"shape" must be a list of integers', '"32x8"']),
    # negative sizes whose product is still the parameter's 256 entries
    (lambda d: d.update(view=[-32, -8]), ["view [-32, -8] must be integers >= 0"]),
    (lambda d: d.update(shape=[-32, -8], view=[-32, -8]), ["shape [-32, -8] must be integers >= 0"]),
    (lambda d: d.update(reduce=[0.5]), ['"reduce" must be null (full Adam) or a list of view dims', "[0.5]"]),
    (lambda d: d.update(reduce="all"), ['"reduce" must be null (full Adam) or a list of view dims', '"all"']),
    (lambda d: d.update(reduce=[True]), ['"reduce" must be null', "[true]"]),
    (lambda d: d.update(parts={"q": 1}), ['"parts" must be null or a list of slices']),
    (lambda d: d.update(aliases="lm_head.weight"), ['"aliases" must be a list of names']),
])
def test_sizes_and_dims_that_are_not_non_negative_integers_are_refused_at_load(tmp_path, edit, words):
    path, doc = _saved(tmp_path)
    edit(doc["layers"][LAYER])
    path.write_text(json.dumps(doc, indent=2))
    msg = _load_error(path)
    assert f"layers[{LAYER!r}]" in msg or f"layer {LAYER!r}" in msg
    for w in words:
        assert w in msg


QKV1 = "transformer.h.0.attn.c_attn.weight"                      # (24, 8): q [0, 8), k [8, 16), v [16, 24)


@pytest.mark.parametrize("edit, words", [
    (lambda ps: ps[1].update(view=[-8, -8]), ["part 'k' view [-8, -8] must be integers >= 0"]),
    (lambda ps: ps[1].update(reduce=[0.5]), ['parts[1].reduce', "must be null (full Adam) or a list of view dims"]),
    (lambda ps: ps[1].update(reduce=[1, 1]), ["part 'k' reduce [1, 1] is out of range for view [8, 8]"]),
    (lambda ps: ps[0].update(dim=0.0), ['parts[0].dim', "must be an integer, found 0.0"]),
    (lambda ps: ps[2].update(stop=24.5), ['parts[2].stop', "must be an integer, found 24.5"]),
    (lambda ps: ps[2].pop("view"), ["parts[2]: missing key 'view'"]),
    (lambda ps: ps.__setitem__(0, "q"), ["parts[0] must be a JSON object", '"q"']),
])
def test_bad_parts_in_a_file_name_the_layer_and_the_part(tmp_path, edit, words):
    path = slimadam_rules(tiny(n_layer=1, fused=True)).save(tmp_path / "plan.json")
    doc = json.loads(path.read_text())
    edit(doc["layers"][QKV1]["parts"])
    path.write_text(json.dumps(doc))
    msg = _load_error(path)
    assert QKV1 in msg
    for w in words:
        assert w in msg


def test_a_file_that_is_not_utf8_is_a_plan_error(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b'{"schema": "\xff"}')
    _load_error(path)


# -- validation against a model -------------------------------------------------------------------

def test_a_plan_validates_against_its_own_model_and_a_fresh_copy():
    plan = slimadam_rules(tiny())
    plan.validate(tiny())
    Plan.loads(plan.dumps()).validate(tiny())


def test_a_plan_for_another_model_names_every_kind_of_difference():
    plan = slimadam_rules(tiny(n_layer=2))                   # vocab 50, tied head
    other = tiny(n_layer=1, vocab_size=60, tied=False)
    with pytest.raises(PlanMismatchError) as err:
        plan.validate(other)
    msg = str(err.value)
    assert "transformer.wte.weight (plan [50, 8], model [60, 8])" in msg
    assert "in the model, not in the plan: lm_head.weight" in msg
    # h.1 has 8 parameters: ln_1, q, k, v, attn c_proj, ln_2, c_fc, mlp c_proj; six are named.
    assert "in the plan, not in the model: transformer.h.1.ln_1.weight" in msg
    assert "transformer.h.1.attn.c_proj.weight" in msg and "(2 more)" in msg
    assert "transformer.h.0." not in msg                   # block 0 is the same in both
    assert isinstance(err.value, PlanError)                # one except clause catches both


def test_a_shape_difference_inside_a_block_is_named():
    plan = slimadam_rules(tiny())
    other = tiny()
    other.transformer.h[1].mlp.c_fc = nn.Linear(8, 16, bias=False)
    with pytest.raises(PlanMismatchError) as err:
        plan.validate(other)
    assert "transformer.h.1.mlp.c_fc.weight (plan [32, 8], model [16, 8])" in str(err.value)


def test_same_parameters_in_another_order_is_a_mismatch():
    plan = slimadam_rules(tiny())
    other = tiny()
    attn = other.transformer.h[0].attn
    del other.transformer.h[0].attn                        # re-register: attn now comes after mlp
    other.transformer.h[0].attn = attn
    # wte, wpe, then block 0: ln_1, ln_2, c_fc, … instead of ln_1, q, k, …
    names = [n for n, _ in other.named_parameters()]
    assert names[2:5] == [H0 + "ln_1.weight", H0 + "ln_2.weight", H0 + "mlp.c_fc.weight"]
    with pytest.raises(PlanMismatchError, match="order"):
        plan.validate(other)


def test_a_hand_edited_fingerprint_on_the_same_parameters_still_validates():
    plan = slimadam_rules(tiny())
    plan.model["fingerprint"] = "sha256:edited"
    plan.validate(tiny())


def _edited_shape_plan(tmp_path) -> os.PathLike:
    """tiny(n_layer=1)'s plan with c_fc's shape and view edited from (32, 8) to (64, 8): consistent in
    itself, fingerprint untouched, so only a comparison with the model's shapes can catch it."""
    path, doc = _saved(tmp_path)
    doc["layers"][LAYER].update(shape=[64, 8], view=[64, 8])
    path.write_text(json.dumps(doc))
    return path


def test_validate_compares_shapes_even_when_the_fingerprint_matches(tmp_path):
    plan = Plan.load(_edited_shape_plan(tmp_path))         # loads: nothing in the file contradicts itself
    model = tiny(n_layer=1)
    assert plan.model["fingerprint"] == model_fingerprint(model_shapes(model))
    # the plan's own figures are off by the edited 32·8 entries: 1,512 = tiny(n_layer=1)'s 1,256 + 256
    assert plan.v_full == 50 * 8 + 8 * 8 + 8 + (4 * 64 + 2 * 32 * 8 + 2 * 8) + 256
    with pytest.raises(PlanMismatchError) as err:
        plan.validate(model)
    msg = str(err.value)
    assert f"{LAYER} (plan [64, 8], model [32, 8])" in msg and "were the layers edited?" in msg


def test_optimizer_and_memory_estimate_refuse_a_plan_with_an_edited_shape(tmp_path):
    from lowmem import optimizer_from_plan
    from lowmem.compress import estimate_state_memory
    path = _edited_shape_plan(tmp_path)
    model = tiny(n_layer=1)
    for apply in (lambda: optimizer_from_plan(model, path), lambda: optimizer_from_plan(model, Plan.load(path)),
                  lambda: estimate_state_memory(model, path), lambda: estimate_state_memory(model, Plan.load(path))):
        with pytest.raises(PlanMismatchError, match=r"mlp\.c_fc\.weight \(plan \[64, 8\], model \[32, 8\]\)"):
            apply()


@pytest.mark.parametrize("edit, words", [
    (lambda lp: setattr(lp, "view", [-32, -8]), ["view [-32, -8] must be integers >= 0"]),
    (lambda lp: setattr(lp, "view", [4, 8, 4]), ["view [4, 8, 4] has 128 entries, shape [32, 8] has 256"]),
    (lambda lp: setattr(lp, "reduce", [2]), ["reduce [2] is not a set of dims of view [32, 8]"]),
    (lambda lp: setattr(lp, "reduce", [0.5]), ["reduce [0.5] is not a set of dims"]),
])
def test_validate_checks_every_layer_of_a_plan_built_in_code(edit, words):
    model = tiny(n_layer=1)
    plan = slimadam_rules(model)
    edit(plan.layers[LAYER])
    with pytest.raises(PlanError) as err:
        plan.validate(model)
    assert f"layer {LAYER!r}" in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_validate_checks_that_parts_cover_the_dim_of_a_plan_built_in_code():
    model = tiny(n_layer=1, fused=True)
    plan = slimadam_rules(model)
    plan.layers[QKV1].parts.pop()                             # v [16, 24) gone: parts cover 16 of 24
    with pytest.raises(PlanError, match=r"layer 'transformer\.h\.0\.attn\.c_attn\.weight': parts cover 16 of 24 along dim 0"):
        plan.validate(model)


@pytest.mark.parametrize("attrs", [["_orig_mod"], ["module"], ["module", "_orig_mod"]])
def test_compile_and_ddp_prefixes_are_normalised(attrs):
    model = tiny()
    wrapped = model
    for attr in reversed(attrs):
        wrapped = Wrapper(wrapped, attr)
    first = next(n for n, _ in wrapped.named_parameters())
    assert first == ".".join(attrs) + ".transformer.wte.weight"
    plan = slimadam_rules(model)
    plan.validate(wrapped)                                 # plan of the bare model, wrapped model
    wplan = slimadam_rules(wrapped)
    assert list(wplan.layers) == list(plan.layers)         # names recorded without the prefixes
    assert wplan.model == plan.model                       # class of the inner model, same fingerprint
    wplan.validate(model)                                  # plan of the wrapped model, bare model


def test_fingerprint_equal_for_identical_models_and_different_for_another_shape():
    a, b = model_fingerprint(model_shapes(tiny())), model_fingerprint(model_shapes(tiny()))
    assert a == b and a.startswith("sha256:") and len(a) == len("sha256:") + 64
    assert model_fingerprint(model_shapes(tiny(n_embd=16))) != a
    assert model_fingerprint(model_shapes(tiny(block_size=9))) != a
    assert slimadam_rules(gpt2_124m()).model["fingerprint"] == slimadam_rules(gpt2_124m()).model["fingerprint"]
    fused = slimadam_rules(gpt2_124m(fused=True)).model["fingerprint"]
    assert fused != slimadam_rules(gpt2_124m()).model["fingerprint"]


def test_fingerprint_depends_on_order_and_ignores_wrapper_prefixes():
    assert model_fingerprint([("a", (1,)), ("b", (2,))]) != model_fingerprint([("b", (2,)), ("a", (1,))])
    assert model_fingerprint([("a", (1, 2))]) != model_fingerprint([("a", (2, 1))])
    assert model_fingerprint([("_orig_mod.a", (1,))]) == model_fingerprint([("a", (1,))])


# -- state memory --------------------------------------------------------------------------------

def test_state_memory_of_the_published_rules_on_gpt2_124m():
    mem = plan_state_memory(slimadam_rules(gpt2_124m()))
    assert mem.adamw_bytes == 2 * 4 * 124_373_760 == 994_990_080
    assert mem.plan_bytes == 4 * (124_373_760 + 153_472) == 498_108_928
    # 1 - 498,108,928 / 994,990,080 = 0.49938…: m stays, v almost vanishes.
    assert mem.saved == pytest.approx(0.499383, abs=1e-6)
    assert format_bytes(mem.adamw_bytes) == "948.90 MiB"       # 994,990,080 / 2**20 = 948.896…


def test_state_memory_of_a_small_plan_by_hand():
    mem = plan_state_memory(_rich_plan())                     # 24 entries, 14 kept
    assert (mem.adamw_bytes, mem.plan_bytes) == (2 * 4 * 24, 4 * (24 + 14))


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (999, "999 B"), (1023, "1.00 KiB"), (1024, "1.00 KiB"), (1536, "1.50 KiB"),
    (3 * 2**20, "3.00 MiB"), (1000 * 2**20, "0.98 GiB"), (999 * 2**20, "999.00 MiB"), (5 * 2**30 // 2, "2.50 GiB"), (2048 * 2**30, "2,048.00 GiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_state_formats_round_trip_and_plan_1_reads_as_fp32(tmp_path):
    from lowmem.compress.formats import FULL, StateFormat
    plan = Plan(model={"class": "M"}, layers={
        "w": LayerPlan([64, 64], "mlp_in", [64, 64], [1], state=StateFormat("int8", "bf16")),
        "b": LayerPlan([64], "bias", [64], None)})
    doc = json.loads(plan.dumps())
    assert doc["schema"] == "lowmem.plan/2"
    assert doc["layers"]["w"]["state"] == {"m": "int8", "v": "bf16"} and "state" not in doc["layers"]["b"]
    back = Plan.loads(plan.dumps())
    assert back.layers["w"].state_format == StateFormat("int8", "bf16") and back.layers["b"].state_format == FULL
    doc["schema"] = "lowmem.plan/1"
    del doc["layers"]["w"]["state"]
    assert Plan.from_json(doc).layers["w"].state_format == FULL


@pytest.mark.parametrize("state, words", [
    ({"m": "int3"}, ["layers['w']", "m format", "int3", "int4"]),
    ({"v": "int4"}, ["layers['w']", "v format", "'int4'"]),
    ({"m": "int8", "q": "fp32"}, ["layers['w']", "\"state\""]),
])
def test_bad_state_format_is_a_plan_error_naming_the_layer(state, words):
    doc = {"schema": "lowmem.plan/2", "model": {}, "layers": {
        "w": {"shape": [4, 4], "role": "other", "view": [4, 4], "reduce": None, "state": state}}}
    with pytest.raises(PlanError) as e:
        Plan.from_json(doc)
    for w in words:
        assert w in str(e.value)
