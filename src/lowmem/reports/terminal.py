"""Rich renderables for the terminal: the plan per layer, its summary, the storage format of each
layer's state, SNR medians per role, optimizer-state memory per optimizer, and exact Hessian blocks.

Each is an object with ``__rich_console__``, so the CLI only prints it and tests render it into
``Console(file=io.StringIO(), width=100, color_system=None)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from lowmem.compress.builders import is_candidate
from lowmem.compress.formats import BLOCK_4BIT, BLOCK_8BIT, MIN_QUANTIZED_NUMEL
from lowmem.compress.memory import FormatGrid, MemoryEstimate, MemoryRow, format_bytes, plan_state_memory
from lowmem.compress.plan import LayerPlan, Plan
from lowmem.compress.peak import MAX_BATCH, PeakReport
from lowmem.compress.precision import ADAMW_BYTES_PER_PARAMETER, layer_state_bytes, plan_bytes_per_parameter
from lowmem.layers import ModelLayers
from lowmem.reports.run import Decision, loss_column
from lowmem.snr.precision import M_CANDIDATES, V_CANDIDATES, WorstError
from lowmem.snr.summary import RoleSnr
from lowmem.snr.views import param_views, subset_words


def shape_text(shape) -> str:
    return "×".join(map(str, shape))


def snr_text(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2f}"


def best_measured(name: str, lp: LayerPlan, layers: ModelLayers | None) -> tuple[str, float | None]:
    """(subset in words, SNR) of the highest time-mean SNR among the plan's candidate subsets."""
    if not lp.snr or layers is None or name not in layers.params:
        return "—", None
    views = {v.name: v for v in param_views(layers.params[name])}
    best = None
    # Raw-view keys first, so a head-view subset equal to a raw one ("fan_in") reads as raw.
    for key, value in sorted(lp.snr.items(), key=lambda kv: kv[0].view != "raw"):
        view = views.get(key.view)
        if view is None or not math.isfinite(value):
            continue
        if is_candidate(view, key.subset) and (best is None or value > best[2]):
            best = (view, key.subset, value)
    if best is None:
        return "—", None
    return subset_words(best[0], best[1]), best[2]


def decision_words(lp: LayerPlan, layers: ModelLayers | None, name: str) -> str:
    """A layer's decision in words: ``full Adam``, ``avg over fan_in``, or per part of a fused
    projection ``q: avg over fan_in, k: full, …`` (axis names from the layer's views; dim numbers
    only where the resolved layers are not at hand)."""
    views = param_views(layers.params[name]) if layers is not None and name in layers.params else []
    if lp.parts:
        return ", ".join(f"{p.name}: " + ("full" if p.reduce is None else
                                          _avg_words([v for v in views if v.part == p.name], p.view, p.reduce))
                         for p in lp.parts)
    if lp.reduce is None:
        return "full Adam"
    return _avg_words([v for v in views if v.part is None], lp.view, lp.reduce)


def _avg_words(views, shape, reduce) -> str:
    for view in views:
        if list(view.shape) == list(shape):
            return "avg over " + subset_words(view, tuple(reduce))
    return f"avg dims {','.join(map(str, reduce))} of {shape_text(shape)}"


class PlanTable:
    """One row per layer: role, shape, best measured subset and its SNR, decision, v kept."""

    def __init__(self, plan: Plan, layers: ModelLayers | None = None):
        self.plan, self.layers = plan, layers

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = []
        for name, lp in self.plan.layers.items():
            best, snr = best_measured(name, lp, self.layers)
            rows.append([name, lp.role, shape_text(lp.shape), best, snr_text(snr),
                         decision_words(lp, self.layers, name), f"{lp.v_kept:,}"])
        headers = ["layer", "role", "shape", "best subset", "SNR", "decision", "v kept"]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
        name_width, names = _fit_names([r[0] for r in rows], widths[1:], options.max_width)
        table = Table(title="Compression plan", title_justify="left", show_edge=False, pad_edge=False)
        for i, h in enumerate(headers):
            table.add_column(h, justify="right" if h in ("SNR", "v kept") else "left",
                             no_wrap=i != 3 and i != 5, overflow="fold",
                             max_width=name_width if i == 0 else None)
        for name, r in zip(names, rows):
            table.add_row(name, *r[1:])
        yield table


# A name component longer than this is elided in the middle rather than widen the name column
# past what the other columns leave it (one 500-character name would squeeze them all to nothing).
_LONGEST_PIECE = 32


def _fit_names(names: list[str], other_widths: list[int], max_width: int) -> tuple[int, list[str]]:
    """The name column's width and `names` fitted to it: the other columns keep their natural
    width, names wrap at dots (never inside a component), and a component too long for the
    column keeps its head and tail around an ellipsis."""
    spare = max_width - sum(other_widths) - 3 * len(other_widths)
    longest_piece = max((len(piece) + 1 for name in names for piece in name.split(".")), default=0)
    width = max(16, spare, min(longest_piece, _LONGEST_PIECE))
    return width, [_wrap_at_dots(_elide_pieces(name, width - 1), width) for name in names]


def _elide_pieces(name: str, limit: int) -> str:
    """`name` with every dot-separated component longer than `limit` cut to its head and tail
    around "…" (`limit` characters in all)."""
    head = limit // 2
    tail = limit - 1 - head
    return ".".join(p if len(p) <= limit else f"{p[:head]}…{p[len(p) - tail:]}" for p in name.split("."))


def _wrap_at_dots(name: str, width: int) -> str:
    """Break `name` into lines of at most `width` characters after dots."""
    if len(name) <= width:
        return name
    lines, line = [], ""
    for piece in name.split("."):
        piece = piece if not line and not lines else "." + piece
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = piece
        else:
            line += piece
    lines.append(line)
    return "\n".join(lines)


class PlanSummary:
    """v entries kept and saved, optimizer-state bytes of AdamW vs the plan."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        p = self.plan
        mem = plan_state_memory(p)
        full, kept = p.v_full, p.v_kept
        table = Table(title="Summary", title_justify="left", show_header=False, show_edge=False, pad_edge=False)
        table.add_column(no_wrap=True)
        table.add_column(justify="right", no_wrap=True)
        table.add_row("parameters (v entries under AdamW)", f"{full:,}")
        table.add_row("v entries kept by the plan", f"{kept:,}")
        table.add_row("v entries saved", f"{full - kept:,} ({(1 - kept / full) if full else 0:.2%})")
        table.add_row("optimizer state, AdamW (m + v, fp32)", format_bytes(mem.adamw_bytes))
        table.add_row("optimizer state, plan (m + kept v, in its formats)", format_bytes(mem.plan_bytes))
        table.add_row("optimizer state saved", f"{format_bytes(mem.adamw_bytes - mem.plan_bytes)} ({mem.saved:.2%})")
        if any(lp.state is not None for lp in p.layers.values()):
            table.add_row("state bytes per parameter, plan's formats (AdamW)",
                          f"{plan_bytes_per_parameter(p):.2f} ({ADAMW_BYTES_PER_PARAMETER:.2f})")
        compressed = sum(1 for lp in p.layers.values() if lp.compressed)
        table.add_row("layers compressed", f"{compressed:,} of {len(p.layers):,}")
        yield table


# (state, format) columns of the state table, in the order the formats get smaller.
STATE_COLUMNS = [("m", f) for f in M_CANDIDATES] + [("v", f) for f in V_CANDIDATES]


def error_text(x: float | None) -> str:
    """A relative error as a percentage (— when not measured)."""
    if x is None:
        return "—"
    return "inf" if not math.isfinite(x) else f"{x:.2%}" if x < 0.1 else f"{x:.1%}"


def state_rows(plan: Plan, precision: dict[str, dict[tuple[str, str], WorstError]] | None) -> list[dict]:
    """Per layer: the chosen formats, bytes of state per parameter entry, and the worst update
    error of each measured format (`STATE_COLUMNS`); what the terminal and the HTML report show."""
    rows = []
    for name, lp in plan.layers.items():
        fmt = lp.state_format
        worst = (precision or {}).get(name, {})
        rows.append({"name": name, "shape": shape_text(lp.shape), "m": fmt.m, "v": fmt.v,
                     "bytes_per_param": layer_state_bytes(lp) / lp.numel if lp.numel else 0.0,
                     "errors": [worst.get(key) for key in STATE_COLUMNS]})
    return rows


class StateTable:
    """One row per layer: how its `m` and kept `v` are stored, bytes of state per parameter entry,
    and the worst update-direction error each format caused over the plan's window; then the whole
    model's bytes per parameter against AdamW's 8."""

    def __init__(self, plan: Plan, precision: dict[str, dict[tuple[str, str], WorstError]] | None = None):
        self.plan, self.precision = plan, precision

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        threshold = self.plan.source.get("precision_threshold")
        rows = [[r["name"], r["shape"], r["m"], r["v"], f"{r['bytes_per_param']:.2f}",
                 *(error_text(w and w.update_error) for w in r["errors"])] for r in state_rows(self.plan, self.precision)]
        headers = ["layer", "shape", "m", "v", "B/param", *(f"{w} {f}" for w, f in STATE_COLUMNS)]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
        name_width, names = _fit_names([r[0] for r in rows], widths[1:], options.max_width)
        passes = f"; < {threshold:.0%} passes" if isinstance(threshold, (int, float)) and threshold > 0 else ""
        table = Table(title=f"Optimizer state formats (worst update-direction error per format{passes})",
                      title_justify="left", show_edge=False, pad_edge=False)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i < 4 else "right", no_wrap=True, overflow="fold",
                             max_width=name_width if i == 0 else None)
        for name, r in zip(names, rows):
            table.add_row(Text(name), *r[1:])
        yield table
        yield Text(f"optimizer state: {plan_bytes_per_parameter(self.plan):.2f} bytes per parameter with the plan's "
                   f"formats, AdamW {ADAMW_BYTES_PER_PARAMETER:.2f} (fp32 m and v); quantized formats hold one fp32 "
                   "scale per block", style="dim")


def print_next_steps(console: Console, lines: list[tuple[str, str, str]]) -> None:
    """``What next``: per step what it is, then its path or command on a line of its own, printed
    whole (soft-wrapped by the terminal, never folded or cropped), so it can be copied."""
    console.print(Text("What next", style="italic"))
    for _, what, text in lines:
        console.print(Text(f"  {what}:", style="dim"), soft_wrap=True)
        console.print(Text(f"    {text}"), soft_wrap=True)


class RoleSnrTable:
    """Median time-mean SNR per role, view and axis subset (the SlimAdam paper's per-role view)."""

    def __init__(self, rows: list[RoleSnr], threshold: float = 1.0):
        self.rows, self.threshold = rows, threshold

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(title=f"SNR by role (median over layers; * above the threshold {self.threshold:g})",
                      title_justify="left", show_edge=False, pad_edge=False,
                      caption=f"* the median layer of this role could average v over these axes (SNR > "
                              f"{self.threshold:g}); each layer is decided by its own SNR (the plan table), and "
                              "norms and tensors whose axes are unknown keep full Adam whatever theirs is; "
                              "averages across experts, heads, unnamed axes or (by default) tokens are measured "
                              "but not planned, so not marked",
                      caption_justify="left", caption_style="dim")
        table.add_column("role", no_wrap=True)
        table.add_column("view", no_wrap=True)
        table.add_column("average over", overflow="fold")
        table.add_column("median SNR", justify="right", no_wrap=True)
        table.add_column("layers", justify="right", no_wrap=True)
        for r in self.rows:
            mark = "*" if r.median > self.threshold and r.plannable else " "
            table.add_row(r.role, r.view, r.axes, f"{snr_text(r.median)}{mark}", str(r.layers))
        yield table


def _share(x: float | None) -> str:
    return "—" if x is None else f"{x:.2%}"


def _size(n: int | None) -> str:
    return "—" if n is None else format_bytes(n)


class MemoryTable:
    """Optimizer-state bytes per optimizer (AdamW first): the format its state is stored in, m, v,
    total, bytes per parameter and the shares of v and of the whole state saved against AdamW,
    under a line naming the model, its size and its parameters' dtype; then, given a
    `FormatGrid`, its `FormatTable`."""

    def __init__(self, estimate: MemoryEstimate, name: str, plan: str | None = None, grid: FormatGrid | None = None):
        self.estimate, self.name, self.plan, self.grid = estimate, name, plan, grid

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        e = self.estimate
        yield Text(f"Optimizer state of {self.name} ({e.model}, {e.parameters:,} {e.param_dtype} parameters)")
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("optimizer", no_wrap=True)
        table.add_column("state", no_wrap=True)
        for header in ("m", "v", "total", "B/param", "v saved", "total saved"):
            table.add_column(header, justify="right", no_wrap=True)
        for r in e.rows:
            table.add_row(r.name, _state_words(r), _size(r.m_bytes), _size(r.v_bytes), format_bytes(r.total_bytes),
                          f"{e.bytes_per_param(r):.3f}", _share(r.v_saved), _share(r.total_saved))
        yield table
        yield Text(f"state: fp32 is the compute dtype, {e.bytes_per_state} bytes an entry; torch AdamW keeps the "
                   "parameters' dtype", style="dim")
        yield Text("step counters not counted; — : no m/v split; binary units (1 GiB = 2^30 bytes)", style="dim")
        if self.plan:
            yield Text(f"plan: {self.plan}", style="dim")
        if self.grid is not None:
            yield Text("")
            yield FormatTable(self.grid)


def batch_words(n: int) -> str:
    """A largest batch: ``12``, or ``≥1,048,576`` where the search stopped looking."""
    return f"≥{n:,}" if n >= MAX_BATCH else f"{n:,}"


def peak_settings(r: PeakReport) -> str:
    """How a `PeakReport` was traced, in words: ``batch 8 x 512, bf16 parameters, …``."""
    shape = " x ".join(str(x) for x in (r.batch, r.seq) if x is not None) or "get_batch(0)'s size"
    settings = [f"batch {shape}", "parameters as built" if r.param_dtype == "as built" else f"{r.param_dtype} parameters"]
    if r.autocast:
        settings.append(f"autocast {r.autocast}")
    if r.checkpointing:
        settings.append("activation checkpointing")
    if r.world > 1:
        settings.append(f"FSDP2 on {r.world} ranks: one rank's figures")
    return ", ".join(settings)


class PeakTable:
    """Peak memory of one training step per optimizer (`lowmem.compress.peak.PeakReport`): what
    is live at the peak by kind, the peak, and under a budget the largest micro-batch that fits."""

    def __init__(self, report: PeakReport, name: str):
        self.report, self.name = report, name

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.report
        fits = f"; the largest micro-batch within {format_bytes(r.budget)}" if r.budget is not None else ""
        yield Text(f"Peak memory of one training step of {self.name} ({peak_settings(r)}){fits}")
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("optimizer", no_wrap=True)
        for header in ("weights", "grads", "state", "activations", "temporaries", "batch", "peak"):
            table.add_column(header, justify="right", no_wrap=True)
        if r.budget is not None:
            table.add_column("max batch", justify="right", no_wrap=True)
            table.add_column("its peak", justify="right", no_wrap=True)
        gaps = any(row.loss_gap is not None for row in r.rows)
        if gaps:
            table.add_column("loss gap", justify="right", no_wrap=True)
        measured = r.measured_on is not None
        reserved = measured and any((row.measured or {}).get("reserved") is not None for row in r.rows)
        if measured:
            table.add_column("measured", justify="right", no_wrap=True)
            table.add_column("/ traced", justify="right", no_wrap=True)
        if reserved:
            table.add_column("reserved", justify="right", no_wrap=True)
        for row in r.rows:
            m = row.memory
            cells = ([format_bytes(x) for x in (m.weights + m.buffers, m.gradients, m.state, m.activations,
                                                 m.temporaries, m.inputs, m.peak)] if m else ["cannot trace"] + [""] * 6)
            if r.budget is not None:
                cells += ["" if row.fits is None else batch_words(row.fits),
                          format_bytes(row.fits_memory.peak) if row.fits_memory else ""]
            if gaps:
                cells.append("" if row.loss_gap is None else f"{row.loss_gap:+.3f}")
            if measured:
                real = (row.measured or {}).get("allocated")
                cells += ["—" if real is None else format_bytes(real),
                          "" if real is None or not m else f"{real / m.peak:.3f}"]
            if reserved:
                res = (row.measured or {}).get("reserved")
                cells.append("—" if res is None else format_bytes(res))
            table.add_row(row.name, *cells)
        yield table
        for row in r.rows:
            if row.error:
                yield Text(f"{row.name}: {row.error}", style="dim")
            elif (row.measured or {}).get("note"):
                yield Text(f"{row.name}: {row.measured['note']}", style="dim")
        if measured:
            kind = ("max_memory_allocated (reserved: max_memory_reserved) after a warm-up" if reserved or
                    r.measured_on.startswith("cuda") else "the peak resident set of a fresh process above its size "
                    "before the model was built (every page the step touched: below about 50 MiB the process's "
                    "own pages dominate the ratio)")
            yield Text(f"measured: two real steps on {r.measured_on}, {kind}", style="dim")
        if gaps:
            yield Text("loss gap: the optimizer's best final loss over the sweep's learning rates minus AdamW's best "
                       "(held-out where the sweep has it); empty: not in the sweep", style="dim")
        yield Text("traced on fake tensors (two real training steps, no memory used): tensor bytes allocated at the peak, "
                   "as allocated (the CUDA caching allocator rounds each tensor up to 512 B: at most that much more per live tensor)", style="dim")
        yield Text("not included: the CUDA context (~0.3-1 GiB), allocator fragmentation, NCCL buffers; leave headroom",
                   style="dim")
        yield Text("weights include buffers; torch AdamW foreach=True (its CUDA default), lowmem's optimizers on their "
                   "foreach backend (an upper bound for the Triton kernels)", style="dim")


class DecisionTable:
    """What a user decides: per candidate optimizer its state, the peak of a training step with it
    (and its share of AdamW's), the largest micro-batch within the budget, and its loss gap to
    AdamW; the columns nothing measured are left out (`lowmem.reports.run.decision_rows`)."""

    def __init__(self, rows: list[Decision], peak: PeakReport | None = None, loss_name: str = "held-out loss",
                 gap_source: str | None = None):
        self.rows, self.peak, self.loss_name, self.gap_source = rows, peak, loss_name, gap_source

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows, peak = self.rows, self.peak
        budget = peak.budget if peak is not None else None
        title = "The decision"
        if budget is not None:
            title += f": which optimizer fits in {format_bytes(budget)}"
        yield Text(title, style="bold")
        adamw = next((r.peak for r in rows if r.name == "adamw" and r.peak), None)
        traced = any(r.peak is not None for r in rows)
        gaps = any(r.loss_gap is not None for r in rows)
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("optimizer", no_wrap=True)
        table.add_column("state", justify="right", no_wrap=True)
        if traced:
            table.add_column("peak", justify="right", no_wrap=True)
            if adamw:
                table.add_column("vs AdamW", justify="right", no_wrap=True)
        if budget is not None:
            table.add_column("max batch", justify="right", no_wrap=True)
        if gaps:
            table.add_column("loss gap", justify="right", no_wrap=True)
        for r in rows:
            cells = [r.name, "—" if r.state is None else format_bytes(r.state)]
            if traced:
                cells.append("—" if r.peak is None else format_bytes(r.peak))
                if adamw:
                    cells.append("" if r.peak is None else f"{r.peak / adamw - 1:+.1%}")
            if budget is not None:
                cells.append("—" if r.fits is None else batch_words(r.fits))
            if gaps:
                cells.append("" if r.loss_gap is None else f"{r.loss_gap:+.4f}")
            table.add_row(*cells)
        yield table
        if traced:
            yield Text(f"peak: one training step ({peak_settings(peak)}), traced on fake tensors; leave headroom for "
                       "the CUDA context and fragmentation", style="dim")
        if budget is not None:
            yield Text(f"max batch: the largest micro-batch whose peak fits in {format_bytes(budget)} (0: not even "
                       "one)", style="dim")
        untraced = [r.name for r in rows if r.error and r.peak is None]
        if untraced:
            yield Text(f"not traced (its step needs tensor values or cannot run on fake tensors): "
                       f"{', '.join(untraced)}", style="dim")
        for r in rows:
            if r.error and r.peak is not None:
                yield Text(f"{r.name}: {r.error}", style="dim")
        if gaps:
            source = f" ({self.gap_source})" if self.gap_source else ""
            yield Text(f"loss gap: best final {self.loss_name} over the learning rates run minus AdamW's{source}; "
                       "empty: not trained, or every run diverged", style="dim")
        elif not traced:
            yield Text("state only: no peak traced and no training run to compare", style="dim")


class FormatTable:
    """Bytes per parameter of each plan optimizer (columns) in each state format (rows), under a
    line giving torch AdamW's with fp32 and with bf16 parameters, the baselines to beat."""

    def __init__(self, grid: FormatGrid):
        self.grid = grid

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        g = self.grid
        baselines = ", ".join(f"{g.estimate.bytes_per_param(row):.3f} with {dtype} parameters"
                              for dtype, row in g.adamw.items())
        yield Text("Bytes per parameter in each state format (m, kept v)")
        yield Text(f"torch AdamW: {baselines}")
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("state", no_wrap=True)
        for name in g.names:
            table.add_column(name, justify="right", no_wrap=True)
        for fmt in g.formats:
            table.add_row(str(fmt), *(f"{g.bytes_per_param(name, fmt):.3f}" for name in g.names))
        yield table
        yield Text(f"fp32 is the compute dtype, {g.estimate.bytes_per_state} bytes, for fp32 and bf16 parameters alike",
                   style="dim")
        yield Text(f"int8, int4: a code an entry and an fp32 scale per {BLOCK_8BIT}, {BLOCK_4BIT} entries of a row",
                   style="dim")
        yield Text(f"an int8 v only where v is kept whole; tensors of 1 dim or under {MIN_QUANTIZED_NUMEL:,} entries "
                   "stay fp32", style="dim")


def _state_words(row: MemoryRow) -> str:
    if row.state is None:
        return "per layer"
    if row.m_bytes is None and row.state.m == row.state.v:   # no m/v split: one dtype for all of it
        return row.state.m
    return str(row.state)


# -- exact Hessian blocks ----------------------------------------------------------------------

_CLASS_WORDS = {"block-diagonal by heads": "block-diag (heads)",
                "block-diagonal (found partition)": "block-diag (found)"}


@dataclass(frozen=True)
class HessianRow:
    """What the terminal shows of one Hessian block.

    Attributes:
        block: the selector (``NAME``, ``NAME[part=q]``, …).
        size: entries of the piece, d of the d × d block.
        label: the class (`lowmem.hessian.classify`'s label); None when the block failed.
        head_mass: (in-partition share, dense baseline) of the per-head partition; None
            without heads.
        groups: groups of the partition found from |H|.
        lambda_max: largest eigenvalue.
        condition: max|λ| / min|λ| over the non-null eigenvalues.
        failure: why the block was not computed (too large, the model failed, …).
        status: what the class column says of a failed block (``"too large"``, ``"failed"``).
    """

    block: str
    size: int
    label: str | None = None
    head_mass: tuple[float, float] | None = None
    groups: int | None = None
    lambda_max: float | None = None
    condition: float | None = None
    failure: str | None = None
    status: str = "failed"


def _fmt_num(x: float | None, spec: str) -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


class HessianTable:
    """One row per Hessian block: size, class, per-head mass against the dense baseline, the
    number of groups found from |H|, λmax and the condition number; the reasons of blocks that
    failed below the table. Names wrap at dots, never inside a component."""

    def __init__(self, rows: list[HessianRow], title: str = "Exact Hessian blocks"):
        self.rows, self.title = rows, title

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        cells = []
        for r in self.rows:
            if r.failure is not None:
                cells.append([r.block, f"{r.size:,}", r.status, "—", "—", "—", "—"])
                continue
            mass = "—" if r.head_mass is None else f"{_fmt_num(r.head_mass[0], '.3f')} ({r.head_mass[1]:.3f})"
            cells.append([r.block, f"{r.size:,}", _CLASS_WORDS.get(r.label, r.label or "—"), mass,
                          "—" if r.groups is None else f"{r.groups:,}", _fmt_num(r.lambda_max, ".4g"),
                          _fmt_num(r.condition, ".3g")])
        headers = ["block", "size", "class", "head mass (dense)", "groups", "λmax", "condition"]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
        # As in PlanTable: the other columns keep their natural width, names wrap at dots only.
        name_width, names = _fit_names([c[0] for c in cells], widths[1:], options.max_width)
        table = Table(title=self.title, title_justify="left", show_edge=False, pad_edge=False)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i in (0, 2) else "right", no_wrap=True, overflow="fold",
                             max_width=name_width if i == 0 else None)
        for name, c in zip(names, cells):   # Text: a selector's "[part=q]" is not rich markup
            table.add_row(Text(name), *c[1:])
        yield table
        failed = [r for r in self.rows if r.failure is not None]
        for r in failed:
            yield Text(f"{r.block}: {r.failure}", style="dim")
        if any(r.head_mass is not None for r in self.rows):
            yield Text("head mass: share of ‖H‖²_F in the per-head diagonal blocks (dense: that of evenly spread "
                       "mass)", style="dim")


# -- optimizers across learning rates -------------------------------------------------------------


@dataclass(frozen=True)
class CompareRow:
    """What the terminal shows of one (optimizer, lr) run."""

    optimizer: str
    lr: float
    status: str                    # complete / diverged
    loss: float | None             # final held-out loss (training loss without a held-out split)
    state_bytes: int
    step_seconds: float | None


def compare_rows(rows: list[dict]) -> list[CompareRow]:
    """`CompareRow`s of comparison runs given as ``compare.csv`` rows (or `RunResult.row()`),
    ranked by `loss_column`: the held-out loss when recorded."""
    key = loss_column(rows)
    return [CompareRow(r["optimizer"], r["lr"], r.get("status") or "complete", r.get(key),
                       int(r.get("state_bytes") or 0), r.get("step_seconds")) for r in rows]


class CompareTable:
    """Optimizer × learning rate: the final loss of each run (``div`` when it diverged) with its
    gap to AdamW's at the same lr, then each optimizer's best lr, its state and step time."""

    def __init__(self, rows: list[CompareRow], loss_name: str = "held-out loss", title: str | None = None):
        self.rows, self.loss_name = rows, loss_name
        self.title = title or f"Final {loss_name} by optimizer and learning rate (gap to AdamW in brackets)"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lrs = sorted({r.lr for r in self.rows})
        names = list(dict.fromkeys(r.optimizer for r in self.rows))
        cell = {(r.optimizer, r.lr): r for r in self.rows}
        adamw = {r.lr: r.loss for r in self.rows if r.optimizer == "adamw" and r.status == "complete"}
        table = Table(title=self.title, title_justify="left", show_edge=False, pad_edge=False)
        table.add_column("optimizer", no_wrap=True)
        for lr in lrs:
            table.add_column(f"lr {lr:g}", justify="right", no_wrap=True)
        for h in ("best lr", "best loss", "state", "step"):
            table.add_column(h, justify="right", no_wrap=True)
        for name in names:
            cells = []
            for lr in lrs:
                r = cell.get((name, lr))
                if r is None:
                    cells.append("")
                elif r.status == "diverged" or r.loss is None or not math.isfinite(r.loss):
                    cells.append("div")
                else:
                    gap = "" if name == "adamw" or lr not in adamw else f" ({r.loss - adamw[lr]:+.3f})"
                    cells.append(f"{r.loss:.3f}{gap}")
            done = [r for r in self.rows if r.optimizer == name and r.status == "complete" and r.loss is not None
                    and math.isfinite(r.loss)]
            best = min(done, key=lambda r: r.loss) if done else None
            state = max(r.state_bytes for r in self.rows if r.optimizer == name)   # a run stopped at step 0 has none
            times = [r.step_seconds for r in self.rows if r.optimizer == name and r.step_seconds]
            table.add_row(name, *cells, "—" if best is None else f"{best.lr:g}", "—" if best is None else f"{best.loss:.3f}",
                          format_bytes(state), "—" if not times else f"{1000 * sorted(times)[len(times) // 2]:.1f} ms")
        yield table
        yield Text("div: a NaN/inf loss stopped the run; state: optimizer state without step counters; "
                   "step: median time of a training step", style="dim")
