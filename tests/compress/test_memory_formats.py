"""Optimizer-state memory in every storage format and for bf16 parameters: each number against
hand arithmetic on known shapes (a 512×1024 Linear, the fp32 fallbacks, a ragged row, llama2-7b),
and where a real optimizer exists, against the bytes of its state tensors after one step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowmem
from lowmem.compress.builders import build_preset
from lowmem.compress.configs import build_config_model
from lowmem.compress.formats import StateFormat
from lowmem.compress.memory import (ALL_FORMATS, MemoryEstimate, estimate_state_memory, format_grid, optimizer_state_bytes,
                                    plan_state_bytes)

M, N = 512, 1024                      # one Linear: weight (512, 1024), 524,288 entries
ENTRIES = M * N


def linear(rows: int = M, cols: int = N, bias: bool = False) -> nn.Module:
    with torch.device("meta"):
        return nn.Linear(cols, rows, bias=bias)


def row_plan(model: nn.Module):
    """Eve's plan: v averaged over each row of a matrix (one entry per row), vectors full."""
    return build_preset("eve", model)


def full_plan(model: nn.Module):
    """Every v kept whole (full Adam), as a plan."""
    plan = build_preset("eve", model)
    for lp in plan.layers.values():
        lp.reduce = None
    return plan


# -- one 512×1024 Linear, by hand -----------------------------------------------------------------

# m's bytes: fp32 4/entry; bf16 2/entry; int8 one byte plus an fp32 scale per 256 entries of a row
# (1024/256 = 4 per row); int4 half a byte plus an fp32 scale per 128 entries (8 per row).
M_BYTES = {"fp32": 4 * ENTRIES, "bf16": 2 * ENTRIES, "int8": ENTRIES + 4 * M * 4, "int4": ENTRIES // 2 + 4 * M * 8}


def test_m_of_a_512_by_1024_linear_in_each_format_by_hand():
    assert M_BYTES == {"fp32": 2_097_152, "bf16": 1_048_576, "int8": 532_480, "int4": 278_528}
    formats = [StateFormat(m) for m in M_BYTES]
    estimate = estimate_state_memory(linear(), optimizers=("eve",), formats=formats)
    assert [r.label for r in estimate.rows] == ["adamw m=fp32,v=fp32"] + [f"eve m={m},v=fp32" for m in M_BYTES]
    for m, want in M_BYTES.items():
        row = estimate["eve", f"m={m}"]
        assert (row.m_bytes, row.v_bytes, row.total_bytes) == (want, M * 4, want + 2048)
        assert estimate.bytes_per_param(row) == (want + 2048) / ENTRIES
        assert row.total_saved == pytest.approx(1 - (want + 2048) / (8 * ENTRIES))
        assert row.v_saved == pytest.approx(1 - 2048 / (4 * ENTRIES))
    assert estimate.bytes_per_param(estimate["adamw"]) == 8.0


def test_a_reduced_v_is_2_bytes_an_entry_in_bf16_and_stays_fp32_when_int8_is_asked():
    estimate = estimate_state_memory(linear(), optimizers=("eve",), formats=("v=bf16", "v=int8", "m=int8,v=int8"))
    assert estimate["eve", "v=bf16"].v_bytes == 2 * M == 1024
    assert estimate["eve", "v=int8"].v_bytes == 4 * M              # 512 kept entries are not quantized
    assert estimate["eve", "m=int8,v=int8"].total_bytes == 532_480 + 2048


def test_a_whole_v_is_quantized_like_m():
    model = linear()
    estimate = estimate_state_memory(model, full_plan(model), optimizers=(), formats=("m=int8,v=int8", "m=int4,v=int8"))
    # v unsigned 8-bit: 524,288 codes + 4·512·4 scales, as m; 8-bit Adam at 2.03 bytes per parameter.
    assert estimate["plan", "m=int8,v=int8"].v_bytes == 532_480
    assert estimate["plan", "m=int8,v=int8"].total_bytes == 2 * 532_480 == 1_064_960
    assert estimate["plan", "m=int4,v=int8"].total_bytes == 278_528 + 532_480
    assert estimate.bytes_per_param(estimate["plan", "m=int8,v=int8"]) == pytest.approx(2.03125)


# -- the fp32 fallbacks and the blocks of a row --------------------------------------------------------

def test_a_bias_stays_fp32_in_every_quantized_format():
    # weight (512, 1024) quantized; bias (512,) has one dim: fp32 m, and its whole v fp32 too.
    estimate = estimate_state_memory(linear(bias=True), optimizers=("eve",), formats=("m=int8,v=int8", "m=int4,v=int8"))
    assert estimate.parameters == ENTRIES + M
    assert estimate["eve", "m=int8,v=int8"].m_bytes == 532_480 + 4 * M
    assert estimate["eve", "m=int4,v=int8"].m_bytes == 278_528 + 4 * M
    assert estimate["eve", "m=int8,v=int8"].v_bytes == 4 * M + 4 * M   # 512 row means + the bias's 512, all fp32
    bf16 = estimate_state_memory(linear(bias=True), optimizers=("eve",), formats=("m=bf16,v=bf16",))["eve"]
    assert (bf16.m_bytes, bf16.v_bytes) == (2 * (ENTRIES + M), 2 * (M + M))   # bf16 has no fallback


@pytest.mark.parametrize("rows, cols, quantized", [(63, 65, False), (64, 64, True), (32, 64, False)])
def test_a_matrix_under_4096_entries_stays_fp32(rows, cols, quantized):
    model = linear(rows, cols)
    got = estimate_state_memory(model, full_plan(model), optimizers=(), formats=("m=int8,v=int8",))["plan"]
    n = rows * cols
    # 64×64 = 4,096 entries: one 8-bit code each and one scale per row (64 ≤ 256 entries).
    want = n + 4 * rows if quantized else 4 * n
    assert (got.m_bytes, got.v_bytes) == (want, want)


def test_blocks_and_4_bit_packing_run_along_each_row():
    model = linear(8, 1001)                                        # 8 rows of 1,001: 8,008 entries
    got = estimate_state_memory(model, optimizers=("eve",), formats=("m=int8", "m=int4"))
    # int8: 1,001 codes + 4 scales (ceil(1001/256)) per row; int4: ceil(1001/2) = 501 bytes + 8 scales per row.
    assert got["eve", "m=int8"].m_bytes == 8 * (1001 + 4 * 4) == 8136
    assert got["eve", "m=int4"].m_bytes == 8 * (501 + 4 * 8) == 4264    # not 4,004 + 4·63 = 4,256 of one long row


def test_llama2_7b_in_int8_and_int4_by_hand():
    # Every llama2-7b matrix has rows of 4,096 or 11,008 entries, whole multiples of 256 and 128
    # blocks; its 2·32 + 1 RMSNorm gains (4,096 each) stay fp32.
    n = 6_738_415_616
    norms = (2 * 32 + 1) * 4096
    matrices = n - norms
    estimate = estimate_state_memory(build_config_model("llama2-7b"), optimizers=("adam-mini",),
                                     formats=("m=int8", "m=int4"), param_dtype="bf16")
    assert estimate["adamw"].total_bytes == 2 * 2 * n == 26_953_662_464
    assert estimate["adam-mini", "m=int8"].m_bytes == matrices + 4 * matrices // 256 + 4 * norms
    assert estimate["adam-mini", "m=int4"].m_bytes == matrices // 2 + 4 * matrices // 128 + 4 * norms


# -- bf16 parameters ------------------------------------------------------------------------------

def test_pure_bf16_adamw_is_4_bytes_per_parameter_and_plan_optimizers_stay_fp32():
    estimate = estimate_state_memory(linear(), optimizers=("eve", "adamem"), param_dtype="bf16")
    adamw, eve = estimate["adamw"], estimate["eve"]
    assert estimate.param_dtype == "bf16" and adamw.state == StateFormat("bf16", "bf16")
    assert (adamw.m_bytes, adamw.v_bytes, adamw.total_bytes) == (2 * ENTRIES, 2 * ENTRIES, 4 * ENTRIES)
    assert estimate.bytes_per_param(adamw) == 4.0
    assert eve.total_bytes == 4 * ENTRIES + 4 * M                  # fp32 m, fp32 row means
    assert eve.total_saved == pytest.approx(1 - (4 * ENTRIES + 4 * M) / (4 * ENTRIES)) and eve.total_saved < 0
    fp32 = estimate_state_memory(linear(), optimizers=("adamem",))
    assert estimate["adamem"].total_bytes == fp32["adamem"].total_bytes   # AdaMeM computes in fp32 either way


def _real_step(model: nn.Module, optimizer) -> int:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer_state_bytes(optimizer).without_step


def test_bf16_estimate_matches_the_state_of_torch_adamw_and_of_a_lowmem_optimizer_on_a_bf16_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(torch.bfloat16)
    estimate = estimate_state_memory(model, optimizers=("eve",), param_dtype="bf16")
    assert _real_step(model, torch.optim.AdamW(model.parameters())) == estimate["adamw"].total_bytes
    assert _real_step(model, lowmem.Eve(model)) == estimate["eve"].total_bytes
    assert estimate["adamw"].total_bytes == 4 * (64 * 96 + 96 + 96 * 32 + 32)


def test_formats_estimate_matches_the_engine_once_it_stores_them(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 64, bias=True), nn.GELU(), nn.Linear(64, 16))   # 32,768-entry matrix, a bias
    plan = row_plan(model)
    for lp in plan.layers.values():
        lp.state = StateFormat("int8", "fp32")
    fp32 = estimate_state_memory(model, optimizers=()).rows[0].total_bytes // 2 + plan.v_kept * 4
    got = _real_step(model, lowmem.optimizer_from_plan(model, plan))
    if got == fp32:
        pytest.skip("the optimizer engine keeps fp32 state: formats are not wired into it yet")
    assert got == estimate_state_memory(model, plan, optimizers=())["plan"].total_bytes


# -- a plan's own formats, rows and documents -----------------------------------------------------------

def test_a_plan_with_its_own_state_entries_gets_one_row_in_them():
    model = linear(bias=True)
    plan = row_plan(model)
    plan.layers["weight"].state = StateFormat("int4", "bf16")       # the bias keeps fp32 (no entry)
    estimate = estimate_state_memory(model, plan, optimizers=(), formats=ALL_FORMATS)
    row = estimate["plan"]                                         # one row: the formats asked are not its
    assert [r.name for r in estimate.rows] == ["adamw", "plan"] and row.state is None and row.label == "plan"
    assert (row.m_bytes, row.v_bytes) == (278_528 + 4 * M, 2 * M + 4 * M)
    assert plan_state_bytes(plan) == (row.m_bytes, row.v_bytes)
    plan.layers["bias"].state = StateFormat("int4", "bf16")        # one format everywhere: the row says it
    row = estimate_state_memory(model, plan, optimizers=())["plan"]
    assert row.state == StateFormat("int4", "bf16") and (row.m_bytes, row.v_bytes) == (278_528 + 4 * M, 2 * M + 2 * M)


def test_rows_are_found_by_name_format_or_label_and_a_name_with_several_formats_is_refused():
    estimate = estimate_state_memory(linear(), optimizers=("eve",), formats=("m=int8", "m=int4", "m=int8,v=fp32"))
    assert len(estimate.rows) == 3                                  # m=int8 twice is one format
    assert estimate["eve m=int4,v=fp32"] is estimate["eve", StateFormat("int4")] is estimate.row("eve", "int4")
    assert estimate["adamw"].name == "adamw"
    with pytest.raises(KeyError, match=r"several rows 'eve'; rows: adamw m=fp32,v=fp32, eve m=int8,v=fp32, eve m=int4"):
        estimate["eve"]
    with pytest.raises(KeyError, match="no row 'eve' in m=bf16,v=fp32"):
        estimate["eve", "m=bf16"]


def test_json_rows_carry_state_and_bytes_per_param_and_read_back():
    estimate = estimate_state_memory(linear(), optimizers=("eve",), formats=("m=int8",), param_dtype="bf16")
    doc = estimate.to_json()
    assert doc["param_dtype"] == "bf16" and doc["bytes_per_state"] == 4
    assert doc["optimizers"][0] == {"name": "adamw", "state": {"m": "bf16", "v": "bf16"}, "m_bytes": 2 * ENTRIES,
                                    "v_bytes": 2 * ENTRIES, "total_bytes": 4 * ENTRIES, "bytes_per_param": 4.0,
                                    "v_saved": 0.0, "total_saved": 0.0}
    assert doc["optimizers"][1] == {"name": "eve", "state": {"m": "int8", "v": "fp32"}, "m_bytes": 532_480,
                                    "v_bytes": 2048, "total_bytes": 534_528, "bytes_per_param": 1.019531,
                                    "v_saved": round(1 - 2048 / (2 * ENTRIES), 6),
                                    "total_saved": round(1 - 534_528 / (4 * ENTRIES), 6)}
    back = MemoryEstimate.from_json(doc)
    assert back.param_dtype == "bf16" and [r.state for r in back.rows] == [r.state for r in estimate.rows]
    assert back.to_json() == doc


def test_a_memory_document_from_before_formats_reads_as_fp32():
    old = {"model": {"class": "Linear", "parameters": 60}, "bytes_per_state": 4,
           "optimizers": [{"name": "adamw", "m_bytes": 240, "v_bytes": 240, "total_bytes": 480, "v_saved": 0.0,
                           "total_saved": 0.0}]}
    estimate = MemoryEstimate.from_json(old)
    assert estimate.param_dtype == "fp32" and estimate["adamw"].state == StateFormat()
    with pytest.raises(ValueError, match="malformed memory document"):
        MemoryEstimate.from_json({**old, "param_dtype": "fp8"})


def test_bad_formats_and_parameter_dtypes_are_refused():
    model = linear()
    with pytest.raises(ValueError, match="m format must be one of fp32, bf16, int8, int4, got 'int3'"):
        estimate_state_memory(model, formats=("m=int3",))
    with pytest.raises(ValueError, match="at least one state format"):
        estimate_state_memory(model, formats=())
    with pytest.raises(ValueError, match="param_dtype must be one of fp32, bf16, got 'fp16'"):
        estimate_state_memory(model, param_dtype="fp16")
    with pytest.raises(ValueError, match="bytes_per_state must be 4 with bf16 parameters"):
        estimate_state_memory(model, bytes_per_state=2, param_dtype="bf16")


def test_bytes_per_state_scales_fp32_entries_only():
    # 2 bytes an fp32 entry: m in fp32 halves, m in int8 does not change.
    estimate = estimate_state_memory(linear(), optimizers=("eve",), formats=("m=fp32", "m=int8"), bytes_per_state=2)
    assert estimate["adamw"].total_bytes == 2 * 2 * ENTRIES
    assert estimate["eve", "m=fp32"].total_bytes == 2 * ENTRIES + 2 * M
    assert estimate["eve", "m=int8"].total_bytes == 532_480 + 2 * M


# -- the grid ------------------------------------------------------------------------------------------

def test_grid_has_every_preset_in_all_twelve_formats_and_adamw_in_both_parameter_dtypes():
    model = linear()
    grid = format_grid(model, row_plan(model))
    assert len(ALL_FORMATS) == 12 and grid.formats == ALL_FORMATS
    assert grid.names == ("slimadam", "eve", "adam-mini", "adam-mini-paper", "adalayer", "plan")
    assert {d: grid.estimate.bytes_per_param(r) for d, r in grid.adamw.items()} == {"fp32": 8.0, "bf16": 4.0}
    assert grid.bytes_per_param("eve", "m=int8") == (532_480 + 2048) / ENTRIES
    assert grid.bytes_per_param("plan", "m=int4,v=bf16") == (278_528 + 1024) / ENTRIES
    doc = grid.to_json()
    assert doc["adamw"]["bf16"]["total_bytes"] == 4 * ENTRIES and len(doc["optimizers"]) == 6 * 12
    plan = row_plan(model)
    plan.layers["weight"].state = StateFormat("int8")
    assert "plan" not in format_grid(model, plan).names            # its own format: the memory table has it
