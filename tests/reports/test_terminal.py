"""Terminal renderables rendered at width 100 without colour, compared with expected text."""

from __future__ import annotations

import io

from rich.console import Console
import torch
from torch import nn

from lowmem.compress.formats import StateFormat
from lowmem.compress.memory import FormatGrid, MemoryEstimate, MemoryRow
from lowmem.compress.plan import LayerPlan, PartPlan, Plan
from lowmem.layers import resolve_layers
from lowmem.reports.terminal import MemoryTable, PlanSummary, PlanTable, RoleSnrTable, decision_words
from lowmem.snr.keys import SnrKey
from lowmem.snr.summary import RoleSnr


def _render(renderable) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = 2
        self.q = nn.Linear(8, 8, bias=False)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.ModuleDict({"decoder": nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({
            "self_attention_block": _Attn()})])})})
        self.ln = nn.LayerNorm(8, bias=False)


Q = "model.decoder.layers.0.self_attention_block.q.weight"


def _keys(snr: dict) -> dict:
    """An SNR record written as plan.json keys it."""
    return {SnrKey.parse(k): v for k, v in snr.items()}


def _plan():
    q = Q
    layers = {
        q: LayerPlan([8, 8], "attn_q", [8, 8], [1], "SNR along fan_in 3.46 > 1",
                     _keys({"0": 0.6, "1": 3.46, "0,1": 0.25, "heads:0": 9.0, "heads:1": 1.2})),
        "ln.weight": LayerPlan([8], "norm", [8], None, "norms keep full Adam", _keys({"0": 0.4})),
    }
    return Plan(model={"class": "_Tiny", "parameters": 72, "fingerprint": "sha256:x"}, layers=layers)


def test_plan_table_skips_head_axis_subsets():
    text = _render(PlanTable(_plan(), resolve_layers(_Tiny(), warn=False)))
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("model.decoder"))
    # Best admissible subset is fan_in (3.46), not heads:0 (9.0, which pools different heads).
    assert "fan_in" in row and "3.46" in row and "avg over fan_in" in row
    assert row.rstrip().endswith("8")          # v kept: 8 rows of 8x8 averaged over fan_in
    norm = next(line for line in lines if line.startswith("ln.weight"))
    assert "full Adam" in norm and norm.rstrip().endswith("8")
    assert all(len(line) <= 100 for line in lines)


def test_plan_summary_counts_and_bytes_by_hand():
    text = _render(PlanSummary(_plan()))
    # v_full = 64 + 8 = 72; kept = 8 + 8 = 16; AdamW 2*72*4 = 576 B; plan (72+16)*4 = 352 B.
    assert "72" in text and "16" in text
    assert "56 (77.78%)" in text
    assert "576 B" in text and "352 B" in text
    assert "224 B (38.89%)" in text
    assert "1 of 2" in text


def test_role_snr_table_marks_passing_medians():
    rows = [RoleSnr("attn_q", "raw", "1", "fan_in", 2.3333, 4), RoleSnr("attn_q", "raw", "0", "fan_out", 0.86, 4)]
    text = _render(RoleSnrTable(rows, threshold=1.0))
    assert "2.33*" in text and "0.86 " in text and "0.86*" not in text


def test_role_snr_table_never_marks_what_no_plan_averages_over():
    # An MoE stack's expert axis (and a head axis) is measured, but no plan averages over it: a
    # median above the threshold there gets no star (the DBRX run showed "expert 5.39*")
    from lowmem.snr.summary import median_by_role
    from lowmem.snr.trajectory import Sample, SnrTrajectory
    from lowmem.snr.views import param_views

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts, self.hidden_size = 2, 4
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 6, 4))   # (expert, out, in)

    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.experts = Stack()
    layers = resolve_layers(model, warn=False)
    (raw,) = param_views(layers["mlp.experts.gate_up_proj"])
    traj = SnrTrajectory([Sample(1, "mlp.experts.gate_up_proj", (2, 6, 4), raw.label(), dims, 5.0, 0.0, 0.0)
                          for dims in ((0,), (2,))])
    rows = {r.subset: r for r in median_by_role(traj, layers)}
    assert (rows["0"].axes, rows["0"].plannable) == ("expert", False) and rows["2"].plannable
    text = _render(RoleSnrTable(list(rows.values()), threshold=1.0))
    assert "5.00*" in text and text.count("5.00*") == 1      # fan_in marked, expert not


def test_long_names_wrap_at_dots_never_inside_a_component():
    for width in (60, 72):
        console = Console(file=io.StringIO(), width=width, color_system=None)
        console.print(PlanTable(_plan(), resolve_layers(_Tiny(), warn=False)))
        lines = console.file.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("model."))
        cells = []
        for line in lines[start:]:
            cell = line.split("│")[0].strip()
            if cell.startswith("ln."):
                break
            cells.append(cell)
        assert len(cells) > 1                               # it had to wrap at this width
        assert "".join(cells) == Q                          # nothing lost
        assert all(c.startswith(".") for c in cells[1:])    # every break is before a dot


def test_memory_table_at_width_100():
    gib, mib = 1 << 30, 1 << 20
    rows = (MemoryRow("adamw", 3 * gib, 3 * gib, 6 * gib, 0.0, 0.0),
            MemoryRow("eve", 3 * gib, 12 * mib, 3 * gib + 12 * mib, 1 - 12 / 3072, 1 - (3072 + 12) / 6144),
            MemoryRow("factored", None, None, 64, None, 1 - 64 / (6 * gib)))
    console = Console(width=100, color_system=None, record=True)
    console.print(MemoryTable(MemoryEstimate("Linear", 805_306_368, 4, rows), "one Linear", "plan.json"))
    assert console.export_text() == (
        "Optimizer state of one Linear (Linear, 805,306,368 fp32 parameters)\n"
        "optimizer ┃ state         ┃        m ┃         v ┃    total ┃ B/param ┃ v saved ┃ total saved\n"
        "━━━━━━━━━━╇━━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━━━\n"
        "adamw     │ m=fp32,v=fp32 │ 3.00 GiB │  3.00 GiB │ 6.00 GiB │   8.000 │   0.00% │       0.00%\n"
        "eve       │ m=fp32,v=fp32 │ 3.00 GiB │ 12.00 MiB │ 3.01 GiB │   4.016 │  99.61% │      49.80%\n"
        "factored  │ fp32          │        — │         — │     64 B │   0.000 │       — │     100.00%\n"
        "state: fp32 is the compute dtype, 4 bytes an entry; torch AdamW keeps the parameters' dtype\n"
        "step counters not counted; — : no m/v split; binary units (1 GiB = 2^30 bytes)\n"
        "plan: plan.json\n")


def test_format_table_under_the_memory_table_at_width_100():
    # bytes per parameter = total / 1,000 parameters; AdamW 8 (fp32) and 4 (bf16) bytes per parameter.
    fp32, int8 = StateFormat(), StateFormat("int8")
    rows = (MemoryRow("adamw", 4000, 4000, 8000, 0.0, 0.0),
            MemoryRow("eve", 4000, 40, 4040, 0.99, 0.495, fp32), MemoryRow("eve", 1062, 40, 1102, 0.99, 0.86, int8),
            MemoryRow("adalayer", 4000, 4, 4004, 0.999, 0.4995, fp32),
            MemoryRow("adalayer", 1062, 4, 1066, 0.999, 0.86675, int8))
    estimate = MemoryEstimate("Linear", 1000, 4, rows)
    adamw = {"fp32": rows[0], "bf16": MemoryRow("adamw", 2000, 2000, 4000, 0.0, 0.0, StateFormat("bf16", "bf16"))}
    bf16 = MemoryEstimate("Linear", 1000, 4, (adamw["bf16"],), "bf16")
    console = Console(width=100, color_system=None, record=True)
    console.print(MemoryTable(bf16, "one Linear", grid=FormatGrid(estimate, adamw)))
    assert console.export_text() == (
        "Optimizer state of one Linear (Linear, 1,000 bf16 parameters)\n"
        "optimizer ┃ state         ┃        m ┃        v ┃    total ┃ B/param ┃ v saved ┃ total saved\n"
        "━━━━━━━━━━╇━━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━━━\n"
        "adamw     │ m=bf16,v=bf16 │ 1.95 KiB │ 1.95 KiB │ 3.91 KiB │   4.000 │   0.00% │       0.00%\n"
        "state: fp32 is the compute dtype, 4 bytes an entry; torch AdamW keeps the parameters' dtype\n"
        "step counters not counted; — : no m/v split; binary units (1 GiB = 2^30 bytes)\n"
        "\n"
        "Bytes per parameter in each state format (m, kept v)\n"
        "torch AdamW: 8.000 with fp32 parameters, 4.000 with bf16 parameters\n"
        "state         ┃   eve ┃ adalayer\n"
        "━━━━━━━━━━━━━━╇━━━━━━━╇━━━━━━━━━\n"
        "m=fp32,v=fp32 │ 4.040 │    4.004\n"
        "m=int8,v=fp32 │ 1.102 │    1.066\n"
        "fp32 is the compute dtype, 4 bytes, for fp32 and bf16 parameters alike\n"
        "int8, int4: a code an entry and an fp32 scale per 256, 128 entries of a row\n"
        "an int8 v only where v is kept whole; tensors of 1 dim or under 4,096 entries stay fp32\n")


def test_hessian_table_at_width_100():
    from lowmem.reports.terminal import HessianRow, HessianTable

    rows = [HessianRow("transformer.h.0.attn.c_attn.weight[part=q]", 1024, "block-diagonal by heads",
                       (0.98765, 0.25), 4, 0.012345678, 123456.7),
            HessianRow("transformer.h.0.attn.c_proj.weight", 1024, "dense", None, 1, 0.5, float("nan")),
            HessianRow("mlp.c_fc.weight", 4096, failure="4,096 × 4,096 entries: 0.12 GiB, over the 0.01 GiB allowed",
                       status="too large")]
    console = Console(width=100, color_system=None, record=True)
    console.print(HessianTable(rows, "Exact Hessian blocks"))
    assert console.export_text() == (
        "Exact Hessian blocks" + " " * 80 + "\n"
        "block                ┃  size ┃ class              ┃ head mass (dense) ┃ groups ┃    λmax ┃ condition\n"
        "━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━╇━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━\n"
        "transformer.h.0.attn │ 1,024 │ block-diag (heads) │     0.988 (0.250) │      4 │ 0.01235 │  1.23e+05\n"
        ".c_attn              │       │                    │                   │        │         │          \n"
        ".weight[part=q]      │       │                    │                   │        │         │          \n"
        "transformer.h.0.attn │ 1,024 │ dense              │                 — │      1 │     0.5 │         —\n"
        ".c_proj.weight       │       │                    │                   │        │         │          \n"
        "mlp.c_fc.weight      │ 4,096 │ too large          │                 — │      — │       — │         —\n"
        "mlp.c_fc.weight: 4,096 × 4,096 entries: 0.12 GiB, over the 0.01 GiB allowed\n"
        "head mass: share of ‖H‖²_F in the per-head diagonal blocks (dense: that of evenly spread mass)\n")


def test_a_500_character_name_is_elided_and_leaves_the_other_columns_whole():
    head, tail = "h" * 250, "t" * 250
    long = f"blocks.0.{head}{tail}.weight"
    layers = {long: LayerPlan([8, 8], "attn_q", [8, 8], [1], "SNR along fan_in", {}),
              "ln.weight": LayerPlan([8], "norm", [8], None, "norms keep full Adam", {})}
    text = _render(PlanTable(Plan(model={"class": "T", "parameters": 72, "fingerprint": "sha256:x"}, layers=layers)))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    rows = [line.split("│") for line in lines if "│" in line]
    first, norm = rows[0], next(r for r in rows if r[0].startswith("ln.weight"))
    # Every other column of both rows holds its whole value on the row's first line.
    assert [c.strip() for c in first[1:]] == ["attn_q", "8×8", "—", "—", "avg dims 1 of 8×8", "8"]   # v averaged over dim 1: 8 rows
    assert [c.strip() for c in norm[1:]] == ["norm", "8", "—", "—", "full Adam", "8"]
    # The name keeps its head and tail around one ellipsis, and wraps at dots only.
    cells = [r[0].strip() for r in rows[:rows.index(norm)] if r[0].strip()]
    name = "".join(cells)
    assert name.startswith("blocks.0.hhh") and name.endswith("ttt.weight") and name.count("…") == 1
    assert all(c.startswith(".") for c in cells[1:])


def _state_plan():
    from lowmem.compress.formats import StateFormat

    layers = {"mlp.c_proj.weight": LayerPlan([64, 128], "mlp_down", [64, 128], None, "full Adam",
                                             state=StateFormat("int8", "bf16")),
              "ln.weight": LayerPlan([64], "norm", [64], None, "norms keep full Adam", state=StateFormat("bf16", "fp32"))}
    return Plan(model={"class": "M", "parameters": 8256, "fingerprint": "sha256:x"}, layers=layers,
                source={"precision_threshold": 0.05})


def test_state_table_formats_bytes_and_errors_by_hand():
    from lowmem.reports.terminal import StateTable
    from lowmem.snr.precision import WorstError

    def w(x):
        return WorstError(x, x / 2, 2)

    precision = {"mlp.c_proj.weight": {("m", "bf16"): w(0.002), ("m", "int8"): w(0.0123), ("m", "int4"): w(0.21),
                                       ("v", "bf16"): w(0.0009), ("v", "int8"): w(0.07)},
                 "ln.weight": {("m", "bf16"): w(0.0018), ("v", "bf16"): w(0.2)}}
    text = _render(StateTable(_state_plan(), precision))
    assert "< 5% passes" in text
    rows = {line.split()[0]: line.replace("│", " ").split() for line in text.splitlines()
            if line.startswith(("mlp.", "ln."))}
    # m int8: 64 rows of 128 codes + one fp32 scale; v bf16: 2 bytes each → (8448 + 16384) / 8192
    assert rows["mlp.c_proj.weight"][1:] == ["64×128", "int8", "bf16", "3.03", "0.20%", "1.23%", "21.0%",
                                             "0.09%", "7.00%"]
    # m bf16 (2 B) + v fp32 (4 B); too small to quantize: no int columns
    assert rows["ln.weight"][1:] == ["64", "bf16", "fp32", "6.00", "0.18%", "—", "—", "20.0%", "—"]
    # (24832 + 384) / 8256 = 3.054…
    assert "3.05 bytes per parameter with the plan's formats, AdamW 8.00" in " ".join(text.split())
    assert all(len(line) <= 100 for line in text.splitlines())
    summary = _render(PlanSummary(_state_plan()))
    assert "state bytes per parameter, plan's formats (AdamW)" in summary and "3.05 (8.00)" in summary
    assert "state bytes per parameter" not in _render(PlanSummary(_plan()))   # a plan without formats


class _Fused(nn.Module):
    """nanoGPT's attention: one (3·8)×8 projection, q, k, v one after the other, 2 heads."""

    def __init__(self):
        super().__init__()
        self.n_head = 2
        self.c_attn = nn.Linear(8, 24, bias=False)


def test_fused_qkv_decisions_name_their_axes_per_part():
    layers = resolve_layers(_Fused(), warn=False)
    info = layers["c_attn.weight"]
    assert [p for p, _ in info.parts] == ["q", "k", "v"]
    # q averaged over its in axis (8 rows kept), k over the out rows within each of its 2 heads
    # (head view 2×4×8: dim 1), v kept whole.
    parts = [PartPlan("q", 0, 0, 8, [8, 8], [1]), PartPlan("k", 0, 8, 16, [2, 4, 8], [1]),
             PartPlan("v", 0, 16, 24, [8, 8], None)]
    lp = LayerPlan([24, 8], "attn_qkv", [24, 8], None, "", None, parts)
    assert decision_words(lp, layers, "c_attn.weight") == "q: avg over fan_in, k: avg over fan_out per head, v: full"
    # Without the resolved layers (a plan file alone), dims are all there is to say.
    assert decision_words(lp, None, "c_attn.weight") == "q: avg dims 1 of 8×8, k: avg dims 1 of 2×4×8, v: full"


def test_role_snr_table_explains_its_marker():
    text = _render(RoleSnrTable([RoleSnr("norm", "raw", "0", "model", 1.7, 2)], threshold=1.0))
    assert "1.70*" in text
    assert "* the median layer of this role could average v over these axes" in " ".join(text.split())
    assert "compresses" not in text
