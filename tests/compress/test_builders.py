"""build_plan from hand-written SNR trajectories: window, strict threshold, choice rules, norms,
token axis, depth averaging, missing samples and fused Q/K/V, each against hand arithmetic."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from lowmem.compress import Plan, PlanError, build_plan, build_preset
from lowmem.layers import resolve_layers
from lowmem.snr.keys import ViewLabel, parse_subset
from lowmem.snr.trajectory import Sample, SnrTrajectory
from lowmem.snr.views import param_views

# Most trajectories below name a few layers only; the warning about the others is tested on its own.
pytestmark = pytest.mark.filterwarnings(r"ignore:lowmem. .* have no SNR sample:UserWarning")   # no colon: it splits the filter

# -- a small nanoGPT: width 8, 2 heads of 4, vocab 10, block 4, no biases, tied head --------------


class Attn(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.n_head = 2
        if fused:
            self.c_attn = nn.Linear(8, 24, bias=False)      # (24, 8): q rows [0, 8), k [8, 16), v [16, 24)
        else:
            self.q = nn.Linear(8, 8, bias=False)            # (8, 8); heads view (2, 4, 8)
            self.k = nn.Linear(8, 8, bias=False)
            self.v = nn.Linear(8, 8, bias=False)
        self.c_proj = nn.Linear(8, 8, bias=False)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(8, 16, bias=False)            # (16, 8)
        self.c_proj = nn.Linear(16, 8, bias=False)          # (8, 16)


class Block(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.ln_1 = nn.LayerNorm(8, bias=False)
        self.attn = Attn(fused)
        self.ln_2 = nn.LayerNorm(8, bias=False)
        self.mlp = MLP()


class GPT(nn.Module):
    def __init__(self, n_layer=2, fused=False):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(10, 8), wpe=nn.Embedding(4, 8),
            h=nn.ModuleList([Block(fused) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(8, bias=False)))
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.transformer.wte.weight = self.lm_head.weight


def model(**kw) -> GPT:
    with torch.device("meta"):
        return GPT(**kw)


def h(i: int, rest: str) -> str:
    return f"transformer.h.{i}.{rest}"


Q0, K0, Q1 = h(0, "attn.q.weight"), h(0, "attn.k.weight"), h(1, "attn.q.weight")
FC0, FC1, FC2 = h(0, "mlp.c_fc.weight"), h(1, "mlp.c_fc.weight"), h(2, "mlp.c_fc.weight")
DOWN0 = h(0, "mlp.c_proj.weight")
LN0 = h(0, "ln_1.weight")
WTE = "transformer.wte.weight"
QKV = h(0, "attn.c_attn.weight")

# View labels written by hand, as `param_views` labels them (checked below).
RAW_Q, HEADS_Q = "raw:8x8", "heads:2x4x8"
RAW_FC = "raw:16x8"


def traj(rows) -> SnrTrajectory:
    """rows: (step, name, view label, subset, snr), labels and subsets as the CSV writes them;
    shape and moments are not read by build_plan."""
    return SnrTrajectory([Sample(step, name, (), ViewLabel.parse(view), parse_subset(subset), snr, 0.0, 0.0)
                          for step, name, view, subset, snr in rows])


def texts(snr: dict) -> dict:
    """A plan's SNR record with its keys as plan.json writes them."""
    return {str(k): v for k, v in snr.items()}


def test_hand_written_view_labels_are_the_ones_param_views_gives():
    # If these drift, every hand-written sample below silently stops matching a view.
    labels = {info.name: [str(v.label()) for v in param_views(info)] for info in resolve_layers(model(), warn=False)}
    assert labels[Q0] == [RAW_Q, HEADS_Q]
    assert labels[FC0] == [RAW_FC]
    assert labels[WTE] == ["raw:10x8"]
    assert labels[LN0] == ["raw:8"]
    fused = {i.name: [str(v.label()) for v in param_views(i)] for i in resolve_layers(model(fused=True), warn=False)}
    assert fused[QKV] == ["q:8x8", "q.heads:2x4x8", "k:8x8", "k.heads:2x4x8", "v:8x8", "v.heads:2x4x8"]


# -- window and threshold ------------------------------------------------------------------------

STEPS = [(100, 9.0), (200, 0.4), (300, 1.8), (400, 9.0)]     # q fan_in SNR at each measured step


@pytest.mark.parametrize("window, mean", [
    ((200, 300), (0.4 + 1.8) / 2),            # 1.1: both ends inclusive
    ((200, 200), 0.4),
    ((300, 300), 1.8),
    ((None, 200), (9.0 + 0.4) / 2),           # 4.7
    ((300, None), (1.8 + 9.0) / 2),           # 5.4
    (None, (9.0 + 0.4 + 1.8 + 9.0) / 4),      # 5.05
    ((150, 350), (0.4 + 1.8) / 2),            # bounds between measurements
])
def test_time_mean_over_an_inclusive_window(window, mean):
    t = traj([(step, Q0, RAW_Q, "1", snr) for step, snr in STEPS])
    lp = build_plan(model(), t, window=window).layers[Q0]
    assert texts(lp.snr) == {"1": pytest.approx(mean)}
    if mean > 1.0:
        assert (lp.reduce, lp.v_kept) == ([1], 8)
        assert f"{mean:.2f} > 1" in lp.why
    else:
        assert lp.reduce is None and lp.v_kept == 64


def test_source_records_the_window_threshold_and_options():
    t = traj([(step, Q0, RAW_Q, "1", snr) for step, snr in STEPS])
    src = build_plan(model(), t, threshold=1.5, window=(200, None), prefer="compression",
                     depth_average=True, source={"probe_lr": 3e-4}).source
    assert src == {"method": "snr", "rule": "lowmem", "threshold": 1.5, "window": [200, 400], "prefer": "compression",
                   "depth_average": True, "measurements": 3, "probe_lr": 3e-4}   # 200, 300, 400
    assert build_plan(model(), t).source["window"] == [100, 400]
    assert build_plan(model(), t).source["measurements"] == 4
    assert build_plan(model(), t, window=(150, 350)).source["measurements"] == 2             # 200, 300
    assert build_plan(model(), t, window=(None, 100)).source["measurements"] == 1


def test_a_subset_at_exactly_the_threshold_does_not_pass():
    t = traj([
        (100, Q0, RAW_Q, "1", 0.5), (200, Q0, RAW_Q, "1", 1.5),      # mean exactly 1.0
        (100, Q0, RAW_Q, "0", 1.0),
        (100, Q0, HEADS_Q, "1,2", 1.0),
    ])
    lp = build_plan(model(), t).layers[Q0]
    assert lp.reduce is None and lp.v_kept == 64
    assert "best SNR 1.00" in lp.why and "not > 1" in lp.why and "full Adam" in lp.why


def test_a_subset_just_above_the_threshold_passes():
    t = traj([(100, Q0, RAW_Q, "1", 1.0 + 1e-9)])
    assert build_plan(model(), t).layers[Q0].reduce == [1]


def test_another_threshold_is_strict_too_and_named_in_why():
    t = traj([(100, FC0, RAW_FC, "0", 2.0), (100, FC1, RAW_FC, "0", 2.5)])
    plan = build_plan(model(), t, threshold=2.0)
    assert plan.layers[FC0].reduce is None and "best SNR 2.00 (along fan_out) not > 2" in plan.layers[FC0].why
    assert plan.layers[FC1].reduce == [0] and plan.layers[FC1].why == "SNR along fan_out 2.50 > 2; role mlp_up: name c_fc"


def test_non_finite_samples_are_skipped_in_the_time_mean():
    t = traj([(100, FC0, RAW_FC, "0", float("nan")), (200, FC0, RAW_FC, "0", 3.0),
              (300, FC0, RAW_FC, "0", 0.0), (400, FC0, RAW_FC, "0", float("inf"))])
    lp = build_plan(model(), t).layers[FC0]
    assert texts(lp.snr) == {"0": pytest.approx(1.5)}       # (3.0 + 0.0) / 2
    assert lp.reduce == [0]


# -- which passing subset wins ----------------------------------------------------------------------

Q_CHOICES = [
    (100, Q0, RAW_Q, "0", 1.5),          # fan_out: keeps 8
    (100, Q0, RAW_Q, "1", 3.0),          # fan_in: keeps 8
    (100, Q0, RAW_Q, "0,1", 0.9),        # one scalar: would keep 1 but does not pass
    (100, Q0, HEADS_Q, "1,2", 1.2),      # one per head: keeps 2
    (100, Q0, HEADS_Q, "0", 50.0),       # pools heads: never a candidate
    (100, Q0, HEADS_Q, "0,1,2", 40.0),   # pools heads: never a candidate
]


def test_the_highest_snr_passing_subset_wins():
    lp = build_plan(model(), traj(Q_CHOICES)).layers[Q0]
    assert (lp.view, lp.reduce, lp.v_kept) == ([8, 8], [1], 8)
    assert lp.why == "SNR along fan_in 3.00 > 1; role attn_q: name q"


def test_a_head_view_subset_wins_when_its_snr_is_highest():
    rows = Q_CHOICES + [(100, Q0, HEADS_Q, "2", 3.5)]          # (head, out) kept: 2 · 4 = 8
    lp = build_plan(model(), traj(rows)).layers[Q0]
    assert (lp.view, lp.reduce, lp.v_kept) == ([2, 4, 8], [2], 8)
    assert lp.why == "SNR along fan_in (heads view) 3.50 > 1; role attn_q: name q"


def test_prefer_compression_picks_the_fewest_kept_entries_among_passing_subsets():
    lp = build_plan(model(), traj(Q_CHOICES), prefer="compression").layers[Q0]
    # Passing: fan_out 8, fan_in 8, heads (out, in) 2; the scalar (1) fails at 0.9.
    assert (lp.view, lp.reduce, lp.v_kept) == ([2, 4, 8], [1, 2], 2)
    assert "1.20 > 1" in lp.why and "heads view" in lp.why


def test_prefer_compression_breaks_ties_by_snr():
    t = traj([(100, FC0, RAW_FC, "0", 1.5), (100, FC0, RAW_FC, "1", 2.5)])   # fan_out keeps 8, fan_in 16
    assert build_plan(model(), t, prefer="compression").layers[FC0].reduce == [0]
    t = traj([(100, Q0, RAW_Q, "0", 1.5), (100, Q0, RAW_Q, "1", 2.5)])       # both keep 8
    assert build_plan(model(), t, prefer="compression").layers[Q0].reduce == [1]


def test_head_pooling_subsets_alone_never_compress():
    t = traj([(100, Q0, HEADS_Q, "0", 50.0), (100, Q0, HEADS_Q, "0,1", 50.0)])
    lp = build_plan(model(), t).layers[Q0]
    assert lp.reduce is None and "no admissible subset" in lp.why


# -- norms and embeddings -------------------------------------------------------------------------

def test_norms_are_never_compressed_even_with_high_snr():
    t = traj([(100, LN0, "raw:8", "0", 100.0), (100, "transformer.ln_f.weight", "raw:8", "0", 100.0)])
    for kw in ({}, {"prefer": "compression"}, {"depth_average": True}, {"threshold": 0.0}):
        plan = build_plan(model(), t, **kw)
        for name in (LN0, "transformer.ln_f.weight"):
            lp = plan.layers[name]
            assert (lp.reduce, lp.v_kept, lp.why) == (None, 8, "norms keep full Adam; role norm: module type LayerNorm")
    assert texts(build_plan(model(), t).layers[LN0].snr) == {"0": 100.0}     # the measurement is still shown


WTE_ROWS = [
    (100, WTE, "raw:10x8", "0", 9.0),      # over tokens: one per model dim, keeps 8
    (100, WTE, "raw:10x8", "0,1", 5.0),    # over everything: keeps 1
    (100, WTE, "raw:10x8", "1", 2.0),      # over the model dim: one per token, keeps 10
]


def test_embedding_token_axis_subsets_are_excluded_by_default():
    lp = build_plan(model(), traj(WTE_ROWS)).layers[WTE]
    assert (lp.reduce, lp.v_kept) == ([1], 10)
    assert lp.why == "SNR along model 2.00 > 1; role embedding: module type Embedding"
    assert lp.aliases == ["lm_head.weight"]
    assert build_plan(model(), traj(WTE_ROWS), prefer="compression").layers[WTE].reduce == [1]


def test_embedding_token_axis_subsets_are_allowed_on_request():
    lp = build_plan(model(), traj(WTE_ROWS), allow_token=True).layers[WTE]
    assert (lp.reduce, lp.v_kept) == ([0], 8)
    lp = build_plan(model(), traj(WTE_ROWS), allow_token=True, prefer="compression").layers[WTE]
    assert (lp.reduce, lp.v_kept) == ([0, 1], 1)


def test_embedding_with_only_token_subsets_passing_keeps_full_adam():
    rows = [r for r in WTE_ROWS if r[3] != "1"] + [(100, WTE, "raw:10x8", "1", 0.5)]
    lp = build_plan(model(), traj(rows)).layers[WTE]
    assert lp.reduce is None and "best SNR 0.50 (along model) not > 1" in lp.why


# -- depth averaging ------------------------------------------------------------------------------

def test_depth_average_shares_one_decision_from_the_mean_snr():
    t = traj([
        (100, FC0, RAW_FC, "0", 3.0), (100, FC1, RAW_FC, "0", 0.3), (100, FC2, RAW_FC, "0", 0.3),
        (100, FC0, RAW_FC, "1", 2.0), (100, FC1, RAW_FC, "1", 0.5), (100, FC2, RAW_FC, "1", 0.4),
    ])
    alone = build_plan(model(n_layer=3), t)
    assert [alone.layers[n].reduce for n in (FC0, FC1, FC2)] == [[0], None, None]
    shared = build_plan(model(n_layer=3), t, depth_average=True)
    # fan_out (3.0 + 0.3 + 0.3) / 3 = 1.2 > 1; fan_in (2.0 + 0.5 + 0.4) / 3 = 0.9667
    for n in (FC0, FC1, FC2):
        lp = shared.layers[n]
        assert lp.reduce == [0] and lp.v_kept == 8
        assert texts(lp.snr) == {"0": pytest.approx(1.2), "1": pytest.approx(2.9 / 3)}
        assert lp.why == "SNR along fan_out 1.20 > 1; role mlp_up: name c_fc"


def test_depth_average_can_turn_compression_off_for_every_layer():
    t = traj([(100, FC0, RAW_FC, "0", 2.0), (100, FC1, RAW_FC, "0", 0.5), (100, FC2, RAW_FC, "0", 0.4)])
    shared = build_plan(model(n_layer=3), t, depth_average=True)
    # (2.0 + 0.5 + 0.4) / 3 = 0.9667, not > 1
    assert [shared.layers[n].reduce for n in (FC0, FC1, FC2)] == [None, None, None]
    assert "best SNR 0.97" in shared.layers[FC0].why


def test_depth_average_does_not_mix_roles_or_shapes():
    t = traj([
        (100, Q0, RAW_Q, "1", 3.0), (100, K0, RAW_Q, "1", 0.2),           # same shape (8, 8), other role
        (100, Q1, RAW_Q, "1", 0.6),                                       # mean with Q0: 1.8
        (100, DOWN0, "raw:8x16", "0", 0.2),                               # mlp_down (8, 16)
        (100, FC0, RAW_FC, "0", 5.0), (100, FC1, RAW_FC, "0", 5.0),       # mlp_up (16, 8)
    ])
    plan = build_plan(model(), t, depth_average=True)
    assert plan.layers[Q0].reduce == plan.layers[Q1].reduce == [1]
    assert texts(plan.layers[Q1].snr) == {"1": pytest.approx(1.8)}
    assert plan.layers[K0].reduce is None and texts(plan.layers[K0].snr) == {"1": pytest.approx(0.2)}
    assert plan.layers[DOWN0].reduce is None and texts(plan.layers[DOWN0].snr) == {"0": pytest.approx(0.2)}
    assert plan.layers[FC0].reduce == [0]


# -- missing samples and fused Q/K/V ------------------------------------------------------------

def test_a_layer_with_no_samples_keeps_full_adam_and_says_so():
    plan = build_plan(model(), traj([(100, FC0, RAW_FC, "0", 2.0)]))
    lp = plan.layers[FC1]
    assert lp.reduce is None and lp.snr is None and "no SNR samples" in lp.why
    # Only FC0 compresses: 128 entries keep 8.
    assert plan.summary["v_kept"] == plan.summary["v_full"] - 128 + 8


def test_samples_outside_the_window_count_as_no_samples():
    t = traj([(100, FC0, RAW_FC, "0", 2.0), (200, FC1, RAW_FC, "0", 2.0)])
    with pytest.warns(UserWarning, match=r"in the window \[200, 300\] and keep full Adam: transformer\.wte\.weight"):
        plan = build_plan(model(), t, window=(200, 300))
    assert plan.layers[FC0].reduce is None and "no SNR samples" in plan.layers[FC0].why
    assert plan.layers[FC1].reduce == [0]                  # its subset "0", measured at step 200


# model(): wte (tied with lm_head), wpe, ln_f and 8 tensors in each of 2 blocks = 19 parameters.
N_PARAMS = 3 + 2 * 8


def test_a_window_that_holds_no_measured_step_is_refused_naming_the_measured_steps():
    t = traj([(step, FC0, RAW_FC, "0", 2.0) for step in range(10, 201, 10)])      # 20 steps: 10 … 200
    with pytest.raises(PlanError) as err:
        build_plan(model(), t, window=(1000, 2000))
    assert str(err.value) == ("window [1,000, 2,000] holds no measured step; the 20 measured steps are "
                              "10, 20, 30, 40, … (12 more), 170, 180, 190, 200")
    assert isinstance(err.value, ValueError)
    with pytest.raises(PlanError, match=r"window \[…, 5\] holds no measured step; the 20 measured steps"):
        build_plan(model(), t, window=(None, 5))
    with pytest.raises(PlanError, match=r"window \[45, 49\] holds no measured step"):   # between two steps
        build_plan(model(), t, window=(45, 49))


def test_an_empty_trajectory_is_refused():
    with pytest.raises(PlanError, match="the SNR trajectory holds no samples"):
        build_plan(model(), SnrTrajectory([]))


def test_another_models_trajectory_is_refused_naming_both_sides():
    t = traj([(10, f"encoder.layers.{i}.fc.weight", RAW_FC, "0", 2.0) for i in range(5)])
    with pytest.raises(PlanError) as err:
        build_plan(model(), t)
    msg = str(err.value)
    assert f"none of the model's {N_PARAMS} parameters has an SNR sample" in msg
    assert f"The model has transformer.wte.weight, transformer.wpe.weight, {LN0}, … ({N_PARAMS - 3} more)" in msg
    assert "the trajectory has encoder.layers.0.fc.weight, encoder.layers.1.fc.weight, " \
           "encoder.layers.2.fc.weight, … (2 more)" in msg


def test_parameters_without_samples_are_named_in_a_warning():
    with pytest.warns(UserWarning) as record:
        plan = build_plan(model(), traj([(100, FC0, RAW_FC, "0", 2.0), (100, Q0, RAW_Q, "1", 2.0)]))
    msgs = [str(w.message) for w in record if "no SNR sample" in str(w.message)]
    assert msgs == [f"lowmem: {N_PARAMS - 2} of {N_PARAMS} parameters have no SNR sample and keep full Adam: "
                    f"transformer.wte.weight, transformer.wpe.weight, {LN0}, {K0}, … ({N_PARAMS - 6} more)"]
    assert len(plan.layers) == N_PARAMS


def test_fused_qkv_decides_each_part():
    t = traj([
        (100, QKV, "q:8x8", "1", 2.0),                 # q: fan_in, keeps 8
        (100, QKV, "q:8x8", "0", 1.5),
        (100, QKV, "k:8x8", "0", 0.5), (100, QKV, "k:8x8", "1", 0.7),    # k: nothing passes, keeps 64
        (100, QKV, "v:8x8", "0", 3.0),                 # v: fan_out 3.0 …
        (100, QKV, "v.heads:2x4x8", "1,2", 4.0),       # … but one per head 4.0 wins, keeps 2
        (100, QKV, "v.heads:2x4x8", "0", 90.0),        # pools heads: never a candidate
    ])
    plan = build_plan(model(fused=True), t)
    lp = plan.layers[QKV]
    assert lp.reduce is None and lp.view == [24, 8]
    assert [(p.name, p.dim, p.start, p.stop, p.view, p.reduce) for p in lp.parts] == [
        ("q", 0, 0, 8, [8, 8], [1]),
        ("k", 0, 8, 16, [8, 8], None),
        ("v", 0, 16, 24, [2, 4, 8], [1, 2]),
    ]
    assert lp.v_kept == 8 + 64 + 2
    q, k, v = lp.parts
    assert q.why == "SNR along fan_in 2.00 > 1"
    assert "best SNR 0.70 (along fan_in) not > 1" in k.why
    assert "4.00 > 1" in v.why and "v.heads view" in v.why
    assert texts(q.snr) == {"q:1": 2.0, "q:0": 1.5} and texts(v.snr)["v.heads:1,2"] == 4.0
    lp.check(QKV)
    assert Plan.loads(plan.dumps()).to_json() == plan.to_json()


def test_fused_qkv_whose_parts_all_keep_full_adam_is_one_whole_layer():
    # Nothing averaged: one full-Adam layer (its v whole, so a state format can store it), its
    # why naming each part's reason, rather than three parts each keeping its own.
    t = traj([(100, QKV, "q:8x8", "1", 0.9), (100, QKV, "k:8x8", "0", 0.5), (100, QKV, "v:8x8", "0", 0.8)])
    lp = build_plan(model(fused=True), t).layers[QKV]
    assert (lp.parts, lp.view, lp.reduce, lp.v_kept) == (None, [24, 8], None, 24 * 8)
    assert lp.why.startswith("q: best SNR 0.90 (along fan_in) not > 1: full Adam; k: best SNR 0.50")
    assert texts(lp.snr) == {"k:0": 0.5, "q:1": 0.9, "v:0": 0.8}


def test_fused_qkv_with_prefer_compression_decides_each_part():
    t = traj([
        (100, QKV, "q:8x8", "1", 2.0), (100, QKV, "q:8x8", "0,1", 1.1),      # q: scalar passes, keeps 1
        (100, QKV, "v:8x8", "0", 3.0),                                         # v: fan_out, keeps 8
    ])
    lp = build_plan(model(fused=True), t, prefer="compression").layers[QKV]
    assert [(p.name, p.reduce) for p in lp.parts] == [("q", [0, 1]), ("k", None), ("v", [0])]
    assert lp.v_kept == 1 + 64 + 8


def test_fused_qkv_with_depth_average_averages_each_part():
    t = traj([
        (100, QKV, "k:8x8", "1", 1.7), (100, h(1, "attn.c_attn.weight"), "k:8x8", "1", 0.5),   # mean 1.1
    ])
    plan = build_plan(model(fused=True), t, depth_average=True)
    for i in (0, 1):
        parts = plan.layers[h(i, "attn.c_attn.weight")].parts
        assert [(p.name, p.reduce) for p in parts] == [("q", None), ("k", [1]), ("v", None)]
        assert texts(parts[1].snr) == {"k:1": pytest.approx(1.1)}


# -- presets read what layers.py resolved -------------------------------------------------------------

def test_adam_mini_keeps_a_norms_bias_full_and_its_weight_one_scalar_by_is_bias():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))     # 1.weight, 1.bias: role norm
    plan = build_preset("adam-mini", net)
    assert (plan.layers["1.weight"].reduce, plan.layers["1.bias"].reduce) == ([0], None)
    # The preset decides by ParamInfo.is_bias, not by the name: flipped, the decisions swap.
    layers = resolve_layers(net, warn=False)
    for name in ("1.weight", "1.bias"):
        layers.params[name] = replace(layers.params[name], is_bias=not layers.params[name].is_bias)
    plan = build_preset("adam-mini", net, layers)
    assert (plan.layers["1.weight"].reduce, plan.layers["1.bias"].reduce) == (None, [0])


# -- unknown layers: full Adam unless their axes are known and measured --------------------------

class _Unknowns(nn.Module):
    def __init__(self):
        super().__init__()
        self.blob = nn.Parameter(torch.zeros(6, 5))          # a raw parameter: axes d0, d1
        self.mystery = nn.Linear(5, 7, bias=False)           # a Linear of an unknown name: (out, in)


def test_an_unknown_linear_follows_its_snr_and_an_unknown_blob_keeps_full_adam():
    m = _Unknowns()
    layers = resolve_layers(m, warn=False)
    assert (layers["mystery.weight"].role, layers["mystery.weight"].axes) == ("other", ("out", "in"))
    t = traj([(10, "mystery.weight", "raw:7x5", "1", 3.0), (10, "mystery.weight", "raw:7x5", "0", 0.5),
              (10, "blob", "raw:6x5", "1", 50.0), (10, "blob", "raw:6x5", "0,1", 50.0)])
    plan = build_plan(m, t)
    lp = plan.layers["mystery.weight"]
    assert lp.reduce == [1] and lp.why.startswith("unknown layer type, measured along its known axes: SNR along fan_in")
    blob = plan.layers["blob"]
    assert blob.reduce is None and blob.why == ("unknown layer type and axes: full Adam; role other: a parameter of "
                                                "_Unknowns that no rule reads: axes unknown")
    # The Linear's why says how its role was (not) found.
    assert lp.why.endswith("; role other: a Linear whose name (mystery) and siblings say nothing of its role")


# -- the paper's rule, exactly -------------------------------------------------------------------
def test_the_paper_rule_takes_raw_subsets_with_the_token_axis_and_no_head_view():
    WPE = "transformer.wpe.weight"
    t = traj([
        (100, Q0, RAW_Q, "0", 0.5), (100, Q0, RAW_Q, "1", 2.0),          # raw: fan_in 2.0
        (100, Q0, HEADS_Q, "1", 5.0),                                      # per-head fan_out 5.0
        (100, WTE, "raw:10x8", "0", 3.0), (100, WTE, "raw:10x8", "1", 2.0),   # token 3.0, model 2.0
        (100, WPE, "raw:4x8", "0", 0.9), (100, WPE, "raw:4x8", "1", 1.4),
    ])
    mine, paper = build_plan(model(), t), build_plan(model(), t, rule="paper")
    assert (mine.layers[Q0].view, mine.layers[Q0].reduce) == ([2, 4, 8], [1])      # one v per head and column
    assert (paper.layers[Q0].view, paper.layers[Q0].reduce) == ([8, 8], [1])       # one v per row
    assert (mine.layers[WTE].reduce, paper.layers[WTE].reduce) == ([1], [0])       # token only in the paper's
    assert mine.layers[WPE].reduce == paper.layers[WPE].reduce == [1]
    assert paper.source["rule"] == "paper" and mine.source["rule"] == "lowmem"
    with pytest.raises(ValueError, match="highest SNR"):
        build_plan(model(), t, rule="paper", prefer="compression")


@pytest.mark.parametrize("fused", [False, True])
def test_the_paper_rule_equals_a_transcription_of_it_on_random_snr(fused):
    # Every view and subset of every layer gets a random SNR; the paper's rule written out here,
    # per tensor (a fused projection's parts as tensors): its own axes' subsets, those > 1, the
    # highest; norms full Adam.
    import random
    rng = random.Random(1)
    layers = resolve_layers(model(fused=fused), warn=False)
    rows = []
    for info in layers:
        for view in param_views(info):
            for k in range(1, 2 ** len(view.shape)):
                subset = ",".join(str(d) for d in range(len(view.shape)) if k >> d & 1)
                rows.append((100, info.name, str(view.label()), subset, rng.uniform(0.2, 3.0)))
    plan = build_plan(model(fused=fused), traj(rows), rule="paper")
    snr = {(name, view, subset): x for _, name, view, subset, x in rows}
    for info in layers:
        tensors = [(v, v.part) for v in param_views(info) if not v.name.endswith("heads")]
        lp = plan.layers[info.name]
        decided = {p.name: (p.view, p.reduce) for p in lp.parts} if lp.parts else {None: (lp.view, lp.reduce)}
        for view, part in tensors:
            cands = {s: x for (n, v, s), x in snr.items() if n == info.name and v == str(view.label()) and x > 1}
            if info.role == "norm" or not cands:
                want = None
            else:
                want = [int(d) for d in max(cands, key=cands.get).split(",")]
            got = decided.get(part, decided.get(None))[1]
            if lp.parts is None and part is not None:     # every part full: one whole full-Adam layer
                got = None
            assert got == want, (info.name, part)
