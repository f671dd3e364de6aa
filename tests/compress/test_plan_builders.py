"""build_plan from hand-written SNR trajectories: window, strict threshold, choice rules, depth averaging."""

from __future__ import annotations

import pytest
from torch import nn

from lowmem.compress import build_plan
from lowmem.snr.trajectory import Sample, SnrTrajectory


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = 2
        self.q = nn.Linear(4, 8, bias=False)       # (out 8, in 4); heads view (2, 4, 4)


class Net(nn.Module):
    def __init__(self, fused=False):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.attn = Attn()
        self.up0 = nn.ModuleDict({"mlp": nn.ModuleDict({"c_fc": nn.Linear(4, 8, bias=False)})})
        self.up1 = nn.ModuleDict({"mlp": nn.ModuleDict({"c_fc": nn.Linear(4, 8, bias=False)})})
        self.ln = nn.LayerNorm(4, bias=False)
        if fused:
            self.attn.c_attn = nn.Linear(4, 12, bias=False)   # parts q, k, v of 4 rows; 2 heads of 2


def traj(rows):
    """rows: (step, name, view_label, subset, snr)."""
    return SnrTrajectory([Sample(step, name, "?", view, subset, snr, 0.0, 0.0) for step, name, view, subset, snr in rows])


Q, UP0, UP1, EMB, LN = ("attn.q.weight", "up0.mlp.c_fc.weight", "up1.mlp.c_fc.weight", "emb.weight", "ln.weight")


def test_time_mean_over_an_inclusive_window_and_strict_threshold():
    t = traj([
        (10, Q, "raw:8x4", "1", 0.2), (20, Q, "raw:8x4", "1", 1.4), (30, Q, "raw:8x4", "1", 0.6),
        (10, UP0, "raw:8x4", "0", 5.0), (20, UP0, "raw:8x4", "0", 1.0), (30, UP0, "raw:8x4", "0", 1.0),
    ])
    # Window [20, 30]: q fan_in mean (1.4 + 0.6) / 2 = 1.0 -> not > 1.0, full Adam.
    plan = build_plan(Net(), t, window=(20, 30))
    assert plan.layers[Q].reduce is None and "not > 1" in plan.layers[Q].why
    assert plan.layers[Q].snr["1"] == pytest.approx(1.0)
    # up0 fan_out mean over [20, 30] = 1.0 -> full; over all steps (5 + 1 + 1) / 3 = 2.33 -> compress dim 0.
    assert plan.layers[UP0].reduce is None
    whole = build_plan(Net(), t)
    assert whole.layers[UP0].reduce == [0] and whole.layers[UP0].v_kept == 4
    assert "2.33 > 1" in whole.layers[UP0].why
    assert whole.layers[Q].snr["1"] == pytest.approx((0.2 + 1.4 + 0.6) / 3)
    assert whole.source["window"] == [10, 30]


def test_highest_snr_wins_or_most_compression_when_preferred():
    t = traj([
        (10, UP0, "raw:8x4", "0", 1.5),       # keeps 4 (one per column)
        (10, UP0, "raw:8x4", "1", 3.0),       # keeps 8 (one per row)
        (10, UP0, "raw:8x4", "0,1", 1.2),     # keeps 1
    ])
    assert build_plan(Net(), t).layers[UP0].reduce == [1]
    assert build_plan(Net(), t, prefer="compression").layers[UP0].reduce == [0, 1]
    assert build_plan(Net(), t, prefer="compression").layers[UP0].v_kept == 1


def test_norms_never_compressed_and_token_axis_excluded_by_default():
    t = traj([
        (10, LN, "raw:4", "0", 50.0),
        (10, EMB, "raw:6x4", "0", 9.0),       # over tokens: excluded by default
        (10, EMB, "raw:6x4", "1", 2.0),       # over the model dim: one per token
    ])
    plan = build_plan(Net(), t)
    assert plan.layers[LN].reduce is None and plan.layers[LN].why == "norms keep full Adam"
    assert plan.layers[EMB].reduce == [1] and plan.layers[EMB].v_kept == 6
    assert build_plan(Net(), t, allow_token=True).layers[EMB].reduce == [0]


def test_head_view_subsets_that_keep_heads_are_candidates_and_those_pooling_heads_are_not():
    t = traj([
        (10, Q, "raw:8x4", "1", 1.5),
        (10, Q, "heads:2x4x4", "0", 40.0),     # pools heads: never a candidate
        (10, Q, "heads:2x4x4", "1,2", 2.5),    # one value per head (Adam-mini's Q/K blocks)
    ])
    lp = build_plan(Net(), t).layers[Q]
    assert (lp.view, lp.reduce, lp.v_kept) == ([2, 4, 4], [1, 2], 2)
    assert "heads view" in lp.why


def test_depth_average_gives_layers_of_one_role_one_decision():
    t = traj([
        (10, UP0, "raw:8x4", "0", 1.8), (10, UP0, "raw:8x4", "1", 0.4),
        (10, UP1, "raw:8x4", "0", 0.6), (10, UP1, "raw:8x4", "1", 0.9),
    ])
    separate = build_plan(Net(), t)
    assert separate.layers[UP0].reduce == [0] and separate.layers[UP1].reduce is None
    shared = build_plan(Net(), t, depth_average=True)
    # Mean over depth: fan_out (1.8 + 0.6) / 2 = 1.2 > 1, fan_in 0.65.
    assert shared.layers[UP0].reduce == shared.layers[UP1].reduce == [0]
    assert shared.layers[UP1].snr["0"] == pytest.approx(1.2)


def test_layers_without_samples_keep_full_adam_and_say_so():
    plan = build_plan(Net(), traj([(10, UP0, "raw:8x4", "0", 2.0)]))
    assert plan.layers[UP1].reduce is None and "no SNR samples" in plan.layers[UP1].why
    assert plan.summary["v_kept"] == plan.summary["v_full"] - 32 + 4


def test_fused_qkv_decides_per_part():
    t = traj([
        (10, "attn.c_attn.weight", "q:4x4", "1", 2.0),
        (10, "attn.c_attn.weight", "k:4x4", "0", 0.5),
        (10, "attn.c_attn.weight", "v:4x4", "0", 3.0),
        (10, "attn.c_attn.weight", "v.heads:2x2x4", "1,2", 4.0),
    ])
    lp = build_plan(Net(fused=True), t).layers["attn.c_attn.weight"]
    assert [(p.name, p.view, p.reduce) for p in lp.parts] == [
        ("q", [4, 4], [1]), ("k", [4, 4], None), ("v", [2, 2, 4], [1, 2])]
    assert lp.v_kept == 4 + 16 + 2


def test_bad_options_are_refused_with_the_value():
    with pytest.raises(ValueError, match="'most'"):
        build_plan(Net(), traj([]), prefer="most")
    with pytest.raises(ValueError, match="-1"):
        build_plan(Net(), traj([]), threshold=-1)
