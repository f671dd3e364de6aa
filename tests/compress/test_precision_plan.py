"""The plan's state formats from hand-written precision measurements: the smallest format below
the threshold at every measurement of the window, v formats only where v is kept whole, fp32
without measurements, and the bytes each choice takes, against hand arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowmem.compress import build_plan
from lowmem.compress.formats import FULL, StateFormat
from lowmem.compress.precision import layer_state_bytes, plan_bytes_per_parameter
from lowmem.compress.plan import Plan, model_record
from lowmem.layers import resolve_layers
from lowmem.reports.run import read_run
from lowmem.snr.keys import ViewLabel
from lowmem.snr.precision import PrecisionSample, PrecisionTrajectory
from lowmem.snr.trajectory import Sample, SnrTrajectory, TrajectoryWriter


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(64, 128, bias=False)      # (128, 64): rows of 64, one short block per row
        self.c_proj = nn.Linear(128, 64, bias=False)    # (64, 128): rows of 128, one block each (short for int8)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(64, bias=False)        # (64,): too small to quantize
        self.mlp = MLP()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([Block()])
        self.head = nn.Linear(64, 10, bias=False)       # (10, 64): too small to quantize; never measured below


FC, PROJ, LN, HEAD = "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight", "h.0.ln_1.weight", "head.weight"


def net() -> Net:
    with torch.device("meta"):
        return Net()


def snr() -> SnrTrajectory:
    """c_fc passes along fan_in (v averaged to 128 entries); c_proj and head fail (v whole)."""
    rows = []
    for step in (10, 20):
        for name, shape, fan_in in ((FC, (128, 64), 3.0), (PROJ, (64, 128), 0.2), (HEAD, (10, 64), 0.2)):
            label = ViewLabel("raw", shape)
            rows += [Sample(step, name, shape, label, (0,), 0.1, 1.0, 1.0),
                     Sample(step, name, shape, label, (1,), fan_in, 1.0, 1.0),
                     Sample(step, name, shape, label, (0, 1), 0.1, 1.0, 1.0)]
        rows.append(Sample(step, LN, (64,), ViewLabel("raw", (64,)), (0,), 5.0, 1.0, 1.0))
    return SnrTrajectory(rows)


# update errors at steps 10 and 20: {(name, state, format): (at 10, at 20)}
ERRORS = {
    (FC, "m", "bf16"): (0.002, 0.002), (FC, "m", "int8"): (0.01, 0.02), (FC, "m", "int4"): (0.09, 0.08),
    (FC, "v", "bf16"): (0.001, 0.001), (FC, "v", "int8"): (0.01, 0.01),
    (PROJ, "m", "bf16"): (0.002, 0.002), (PROJ, "m", "int8"): (0.03, 0.03), (PROJ, "m", "int4"): (0.04, 0.06),
    (PROJ, "v", "bf16"): (0.001, 0.001), (PROJ, "v", "int8"): (0.07, 0.07),
    (LN, "m", "bf16"): (0.002, 0.003), (LN, "v", "bf16"): (0.2, 0.2),
}
SHAPES = {FC: (128, 64), PROJ: (64, 128), LN: (64,)}


def precision() -> PrecisionTrajectory:
    return PrecisionTrajectory([PrecisionSample(step, name, SHAPES[name], which, fmt, e / 2, e)
                                for (name, which, fmt), errors in ERRORS.items()
                                for step, e in zip((10, 20), errors)])


def test_the_smallest_format_below_the_threshold_at_every_measurement_is_chosen():
    plan = build_plan(net(), snr(), precision=precision(), precision_threshold=0.05)
    fc, proj, ln, head = (plan.layers[n] for n in (FC, PROJ, LN, HEAD))
    assert fc.reduce == [1] and proj.reduce is None            # the SNR decisions the formats depend on
    # int8 error 0.02 < 0.05 < int4 error 0.09: int8; v averaged: fp32 whatever its measurements say
    assert fc.state == StateFormat("int8", "fp32")
    # int4 passes at step 10 (0.04) but not at 20 (0.06): int8; v int8 0.07 fails, bf16 0.001 passes
    assert proj.state == StateFormat("int8", "bf16")
    # a norm is measured like any layer: bf16 m passes, bf16 v (0.2) does not
    assert ln.state == StateFormat("bf16", "fp32")
    # no measurement: fp32, and said so
    assert head.state == FULL and "no precision measurement" in head.why
    assert "m int8 (update error 2.00% < 5.00%; int4 9.00%)" in fc.why and "v fp32 (averaged)" in fc.why
    assert fc.why.startswith("SNR along fan_in 3.00 > 1")       # the SNR reason stays first
    assert "v fp32 (bf16 update error 20.0% ≥ 5.00%)" in ln.why
    assert plan.source["precision_threshold"] == 0.05
    # the state survives plan.json
    back = Plan.loads(plan.dumps())
    assert {n: lp.state for n, lp in back.layers.items()} == {n: lp.state for n, lp in plan.layers.items()}


def test_the_window_of_the_snr_decides_the_formats_too():
    plan = build_plan(net(), snr(), window=(10, 10), precision=precision(), precision_threshold=0.05)
    assert plan.layers[PROJ].state.m == "int4"        # only step 10 counts: int4's 0.04 < 0.05


def test_a_threshold_between_int8_and_bf16_errors_picks_bf16():
    plan = build_plan(net(), snr(), precision=precision(), precision_threshold=0.025)
    assert plan.layers[FC].state.m == "int8"          # int8 reached 0.02 < 0.025
    assert plan.layers[PROJ].state.m == "bf16"        # int8 reached 0.03 >= 0.025
    plan = build_plan(net(), snr(), precision=precision(), precision_threshold=0.015)
    assert plan.layers[FC].state.m == "bf16"          # 0.02 >= 0.015
    plan = build_plan(net(), snr(), precision=precision(), precision_threshold=0.002)
    assert plan.layers[FC].state.m == "fp32"          # strictly below: bf16's 0.002 does not pass


def test_threshold_zero_or_no_measurements_keep_fp32_state_without_state_entries():
    off = build_plan(net(), snr(), precision=precision(), precision_threshold=0)
    assert all(lp.state is None and lp.state_format == FULL for lp in off.layers.values())
    assert off.source["precision_threshold"] == 0
    old = build_plan(net(), snr())
    assert all(lp.state is None for lp in old.layers.values()) and "precision_threshold" not in old.source
    assert [lp.why for lp in old.layers.values()] == [lp.why for lp in off.layers.values()]
    assert all("state" not in d for d in old.to_json()["layers"].values())


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.05"])
def test_a_bad_precision_threshold_is_refused_with_its_value(bad):
    with pytest.raises(ValueError, match="precision_threshold must be a finite number >= 0"):
        build_plan(net(), snr(), precision=precision(), precision_threshold=bad)


def test_state_bytes_by_hand():
    plan = build_plan(net(), snr(), precision=precision(), precision_threshold=0.05)
    # c_fc: m int8, 128 rows of 64 codes and one fp32 scale; v averaged to 128 fp32 entries
    assert layer_state_bytes(plan.layers[FC]) == 128 * (64 + 4) + 128 * 4 == 9216
    # c_proj: m int8, 64 rows of 128 codes + 1 scale; v bf16, 2 bytes each
    assert layer_state_bytes(plan.layers[PROJ]) == 64 * (128 + 4) + 2 * 8192 == 24832
    # ln: m bf16, v fp32
    assert layer_state_bytes(plan.layers[LN]) == 2 * 64 + 4 * 64
    # head: fp32 both
    assert layer_state_bytes(plan.layers[HEAD]) == 8 * 640
    n = 8192 + 8192 + 64 + 640
    assert plan_bytes_per_parameter(plan) == pytest.approx((9216 + 24832 + 384 + 5120) / n)
    # int4 m packs two codes to a byte per row: 64 rows of 128 → 64 bytes and one scale each
    plan.layers[PROJ].state = StateFormat("int4", "int8")
    assert layer_state_bytes(plan.layers[PROJ]) == 64 * (64 + 4) + 64 * (128 + 4)


def test_an_old_run_folder_without_precision_data_builds_fp32_state(tmp_path):
    """A folder from before precision was measured (layers.json and snr.csv, killed before its
    plan): the report rebuilds a plan whose every layer keeps fp32 state."""
    model = Net()
    (tmp_path / "layers.json").write_text(json.dumps({**resolve_layers(model, warn=False).to_json(),
                                                      "model": model_record(model)}))
    writer = TrajectoryWriter(tmp_path / "snr.csv")
    writer.write(snr().samples)
    writer.close()
    run = read_run(tmp_path)
    assert run.precision is None and run.plan is not None
    assert run.plan.layers[FC].reduce == [1]                   # the SNR decisions are still made
    assert all(lp.state is None and lp.state_format == FULL for lp in run.plan.layers.values())
    assert any("fp32 state" in n for n in run.notes)
    assert plan_bytes_per_parameter(run.plan) == pytest.approx((4 * 17088 + 4 * (128 + 8192 + 64 + 640)) / 17088)
