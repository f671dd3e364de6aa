"""Figures of the HTML report, drawn with seaborn/matplotlib and returned as base64 PNG.

Every figure is drawn on its own `matplotlib.figure.Figure` with an Agg canvas (pyplot is never
touched) inside `_style()`, which starts from matplotlib's defaults and applies seaborn's style
for this figure only: a user's rcParams, seaborn theme and pyplot state are left as they were.

Each function takes plain data and returns a `Figure` record, or None when there is nothing to
draw. Runs with hundreds of layers stay readable: the heatmap pools layers of one role into depth
bins past `MAX_HEATMAP_ROWS` rows, and the depth plot draws one panel per role.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np

from lowmem.compress.memory import MemoryRow
from lowmem.reports.run import LayerSnr, loss_column

MAX_HEATMAP_ROWS = 80
DPI = 100
_MiB, _GiB = 2 ** 20, 2 ** 30


@dataclass(frozen=True)
class Figure:
    """One figure as the report embeds it."""

    id: str
    title: str
    caption: str
    png: str          # base64 of the PNG bytes
    width: int        # pixels
    height: int
    alt: str


@contextlib.contextmanager
def _style():
    import matplotlib
    import matplotlib.style
    import seaborn as sns

    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85),
          "figure.dpi": DPI, "savefig.dpi": DPI, "axes.prop_cycle": matplotlib.cycler(color=sns.color_palette("colorblind")),
          "svg.hashsalt": "lowmem", "text.parse_math": False}   # a "$" in a layer name is text
    with matplotlib.style.context("default"), matplotlib.rc_context(rc):
        yield


def _new(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _encode(fig, id: str, title: str, caption: str, alt: str) -> Figure:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    width, height = fig.canvas.get_width_height()
    return Figure(id, title, caption, base64.b64encode(buf.getvalue()).decode("ascii"), width, height, alt)


def binary_unit(n: float) -> tuple[float, str]:
    """(divisor, unit) of the binary unit that shows `n` bytes best: MiB below 1 GiB, else GiB."""
    return (_GiB, "GiB") if n >= _GiB else (_MiB, "MiB")


# -- summary -------------------------------------------------------------------------------------


def memory_bars(rows: list[MemoryRow], model: str) -> Figure | None:
    """Optimizer-state bytes per optimizer (m and v stacked where they are known)."""
    if not rows:
        return None
    div, unit = binary_unit(max(r.total_bytes for r in rows))
    with _style():
        import seaborn as sns

        palette = sns.color_palette("colorblind")
        fig = _new(7.5, 0.42 * len(rows) + 1.2)
        ax = fig.add_subplot()
        names = [r.name for r in rows]
        y = np.arange(len(rows))
        for i, r in enumerate(rows):
            if r.m_bytes is not None and r.v_bytes is not None:
                ax.barh(i, r.m_bytes / div, color=palette[0], label="m (first moment)" if i == 0 else None)
                ax.barh(i, r.v_bytes / div, left=r.m_bytes / div, color=palette[1] if r.name != "plan" else palette[2],
                        label="v (second moment)" if i == 0 else None)
            else:
                ax.barh(i, r.total_bytes / div, color=palette[7], label="state (no m/v split)"
                        if not any(x.m_bytes is None for x in rows[:i]) else None)
            saved = "" if r.name == "adamw" else f"  −{r.total_saved:.0%}"
            ax.text(r.total_bytes / div, i, f" {r.total_bytes / div:,.2f} {unit}{saved}", va="center", fontsize=8)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel(f"optimizer state ({unit})")
        ax.set_xlim(0, max(r.total_bytes for r in rows) / div * 1.35)
        ax.legend(loc="lower right", fontsize=8)
        return _encode(fig, "fig-memory", "Optimizer-state memory",
                       f"State bytes of {model} per optimizer, fp32 entries; the plan's v in green.",
                       "bar chart of optimizer-state memory per optimizer")


# -- SNR -------------------------------------------------------------------------------------------


def _columns(layers: list[LayerSnr]) -> list[str]:
    order: dict[str, None] = {}
    for layer in layers:
        for words in layer.subsets:
            order.setdefault(words, None)
    # Single axes first, then combinations; stable within each.
    return sorted(order, key=lambda w: (w.count("+"), "per head" in w))


def _pool_rows(layers: list[LayerSnr], columns: list[str]) -> tuple[list[str], np.ndarray, bool]:
    """Rows of the heatmap: one per layer, or per (role, depth bin) as the median when too many."""
    def row(ls: list[LayerSnr]) -> list[float]:
        out = []
        for c in columns:
            vals = [l.subsets[c].mean for l in ls if c in l.subsets and math.isfinite(l.subsets[c].mean)]
            out.append(float(np.median(vals)) if vals else np.nan)
        return out

    if len(layers) <= MAX_HEATMAP_ROWS:
        return [l.label for l in layers], np.array([row([l]) for l in layers], dtype=float).reshape(len(layers), -1), False
    roles: dict[str, list[LayerSnr]] = {}
    for l in layers:
        roles.setdefault(l.role, []).append(l)
    per_role = max(1, MAX_HEATMAP_ROWS // len(roles))
    labels, values = [], []
    for role, ls in roles.items():
        bins = min(per_role, len(ls))
        for b in range(bins):
            chunk = ls[b * len(ls) // bins:(b + 1) * len(ls) // bins]
            labels.append(f"{role} depth {chunk[0].depth}–{chunk[-1].depth} ({len(chunk)})"
                          if len(chunk) > 1 else f"{role} depth {chunk[0].depth}")
            values.append(row(chunk))
    return labels, np.array(values, dtype=float), True


def snr_heatmap(layers: list[LayerSnr], threshold: float) -> Figure | None:
    """Layers × axis subsets, time-mean SNR on a log colour scale centred on the threshold."""
    if not layers:
        return None
    from matplotlib.colors import TwoSlopeNorm

    columns = _columns(layers)
    labels, values, pooled = _pool_rows(layers, columns)
    logv = np.log10(np.where(values > 0, values, np.nan))
    finite = logv[np.isfinite(logv)]
    centre = math.log10(threshold) if threshold > 0 else 0.0
    span = max(1.0, float(np.max(np.abs(finite - centre))) if finite.size else 1.0)
    with _style():
        import seaborn as sns

        longest = max(len(l) for l in labels)
        fig = _new(min(16.0, 2.0 + 0.075 * longest + 0.9 * len(columns)), 1.6 + 0.2 * len(labels))
        ax = fig.add_subplot()
        cmap = sns.color_palette("vlag_r", as_cmap=True).with_extremes(bad="#eeeeee")
        sns.heatmap(logv, ax=ax, cmap=cmap, norm=TwoSlopeNorm(centre, centre - span, centre + span),
                    xticklabels=columns, yticklabels=labels, linewidths=0.4, linecolor="white",
                    annot=values if len(columns) * len(labels) <= 1200 else False, fmt=".2g",
                    annot_kws={"fontsize": 7})
        cbar = ax.collections[0].colorbar
        cbar.ax.axhline(centre, color="black", lw=2)
        cbar.ax.yaxis.set_major_formatter(_log10_labels())
        cbar.set_label(f"time-mean SNR (log scale; black line: threshold {threshold:g})")
        ax.tick_params(axis="y", labelsize=7)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_xlabel("average v over")
        ax.set_ylabel("")
        caption = (f"Time-mean SNR per layer and axis subset: blue above the threshold {threshold:g} (averaging v "
                   "over these axes would pass), red below it, grey: not measured or not a candidate. A cell is a "
                   "measurement, not a decision: the plan averages each layer over at most one passing subset, "
                   "and norms keep full Adam whatever their SNR (see the plan table).")
        if pooled:
            caption += f" {len(layers)} layers pooled by role and depth (median per bin)."
        return _encode(fig, "fig-snr-heatmap", "SNR by layer and axis", caption,
                       "heatmap of time-mean SNR, layers by axis subsets")


def snr_vs_depth(layers: list[LayerSnr], threshold: float) -> Figure | None:
    """Per role, time-mean SNR against depth, one line per subset (as the SlimAdam depth plots)."""
    roles: dict[str, list[LayerSnr]] = {}
    for l in layers:
        if l.subsets:
            roles.setdefault(l.role, []).append(l)
    roles = {r: ls for r, ls in roles.items() if len(ls) > 1}
    if not roles:
        return None
    ncols = min(3, len(roles))
    nrows = math.ceil(len(roles) / ncols)
    with _style():
        fig = _new(4.2 * ncols, 3.0 * nrows + 0.3)
        for i, (role, ls) in enumerate(roles.items()):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            for words in _columns(ls):
                pts = [(l.depth, l.subsets[words].mean) for l in ls if words in l.subsets]
                pts = [(d, v) for d, v in pts if math.isfinite(v) and v > 0]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, lw=1.3, label=words)
            ax.axhline(threshold, color="black", ls="--", lw=1)
            _log_y(ax)
            ax.xaxis.set_major_locator(_integer_ticks())
            ax.set_title(role, fontsize=10)
            ax.set_xlabel("depth (layer of this role)")
            ax.set_ylabel("time-mean SNR")
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
        return _encode(fig, "fig-snr-depth", "SNR against depth",
                       f"Per role, the time-mean SNR of each axis subset against depth; dashed: threshold {threshold:g}.",
                       "line plots of SNR against depth, one panel per role")


def chosen_layers(layers: list[LayerSnr], per_role: int = 1) -> list[LayerSnr]:
    """A few layers worth a trajectory plot: the middle-depth layer of each role with SNR."""
    roles: dict[str, list[LayerSnr]] = {}
    for l in layers:
        if l.subsets and any(len(s.steps) > 1 for s in l.subsets.values()):
            roles.setdefault(l.role, []).append(l)
    picked = []
    for ls in roles.values():
        step = max(1, len(ls) // (per_role + 1))
        picked += ls[step - 1::step][:per_role] if len(ls) > 1 else ls
    return picked


def snr_trajectories(layers: list[LayerSnr], threshold: float) -> Figure | None:
    """SNR over training steps for each given layer, one line per subset."""
    if not layers:
        return None
    ncols = min(3, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    with _style():
        fig = _new(4.2 * ncols, 3.0 * nrows + 0.3)
        for i, l in enumerate(layers):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            for s in l.subsets.values():
                v = np.array(s.values, dtype=float)
                ok = np.isfinite(v) & (v > 0)
                if ok.any():
                    ax.plot(np.array(s.steps)[ok], v[ok], lw=1.2, label=s.words)
            ax.axhline(threshold, color="black", ls="--", lw=1)
            _log_y(ax)
            ax.set_title(_short(l.label), fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("SNR")
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
        return _encode(fig, "fig-snr-trajectories", "SNR over training",
                       f"Middle-depth layer of each role; dashed: threshold {threshold:g}. Every layer: the viewer below.",
                       "SNR trajectories of selected layers")


def _log_y(ax) -> None:
    """Log y axis labelled with plain numbers (0.3, 1, 3) rather than 3×10⁻¹."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _plain_labels(minor: bool = False):
    """Tick labels as plain numbers (0.003); minor ticks labelled only at 2 and 5 × a decade."""
    from matplotlib.ticker import FuncFormatter

    def label(v, _):
        if not minor:
            return f"{v:g}"
        lead = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if lead in (2, 3, 5) else ""
    return FuncFormatter(label)


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _log10_labels():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{10 ** v:.2g}")


def _short(label: str, width: int = 44) -> str:
    """Keep the end of a long name, where the layer's own parts are."""
    return label if len(label) <= width else "…" + label[-(width - 1):]


# -- Hessian -----------------------------------------------------------------------------------------


def pooled_abs(path, cells: int = 192, shape: list[int] | None = None, out_axis: int = 0) -> np.ndarray:
    """|H| max-pooled to at most `cells` × `cells`, read through a memory map (blocks can be GBs).

    With the piece's `shape` and `out_axis` (``hessian.json``'s ``shape`` and ``out_axis``),
    entries are first put output-unit major, as the Hessian heatmaps and head lines read them.
    """
    H = np.load(path, mmap_mode="r")
    d = H.shape[0]
    order = np.arange(d)
    if shape is not None and out_axis and len(shape) > 1 and int(np.prod(shape)) == d:
        order = np.moveaxis(order.reshape(shape), out_axis, 0).reshape(-1)
    edges = np.linspace(0, d, min(cells, d) + 1).astype(int)
    rows = [np.abs(H[np.sort(order[edges[i]:edges[i + 1]])]).max(axis=0)[order] for i in range(len(edges) - 1)]
    return np.maximum.reduceat(np.stack(rows), edges[:-1], axis=1)


def hessian_block(block: dict, pooled: np.ndarray | None, eigenvalues: np.ndarray | None, index: int) -> Figure | None:
    """|H| of one block (log colour, pooled when large) beside its sorted eigenvalues."""
    if pooled is None and eigenvalues is None:
        return None
    from matplotlib.colors import LogNorm

    with _style():
        import matplotlib

        panels = (pooled is not None) + (eigenvalues is not None)
        fig = _new(4.3 * panels, 3.7)
        k = 1
        if pooled is not None:
            ax = fig.add_subplot(1, panels, k)
            k += 1
            top = float(pooled.max()) if pooled.size else 0.0
            cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
            if top > 0:
                positive = pooled[pooled > 0]
                norm = LogNorm(vmin=max(float(positive.min()), top * 1e-12), vmax=top)
                image = ax.imshow(np.ma.masked_equal(pooled, 0.0), cmap=cmap, norm=norm, interpolation="nearest")
                fig.colorbar(image, ax=ax, label="|H| (log)", shrink=0.85)
            ax.grid(False)
            heads = block.get("heads")
            size = block.get("size") or pooled.shape[0]
            if heads:
                for h in range(1, heads):
                    edge = h * pooled.shape[0] / heads - 0.5
                    ax.axhline(edge, color="red", lw=0.6, alpha=0.7)
                    ax.axvline(edge, color="red", lw=0.6, alpha=0.7)
            pooled_note = "" if pooled.shape[0] == size else f" (max-pooled to {pooled.shape[0]}²)"
            ax.set_title(f"|H|{pooled_note}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        if eigenvalues is not None:
            ax = fig.add_subplot(1, panels, k)
            ev = np.sort(np.asarray(eigenvalues, dtype=float))[::-1]
            ax.plot(np.arange(1, len(ev) + 1), ev, lw=1.2)
            top = float(np.max(np.abs(ev))) if ev.size else 1.0
            ax.set_yscale("symlog", linthresh=max(top * 1e-6, 1e-300))
            ax.set_xlabel("index (descending)")
            ax.set_ylabel("eigenvalue")
            ax.set_title("spectrum", fontsize=9)
        name = block.get("block", f"block {index}")
        label = (block.get("class") or {}).get("label") or block.get("status", "")
        return _encode(fig, f"fig-hessian-{index}", "Class", label,
                       f"heatmap and spectrum of the Hessian block {name}")


# -- comparison ----------------------------------------------------------------------------------------


def _optimizer_colors(rows: list[dict]) -> dict[str, str]:
    """One colour per optimizer, by its first appearance in `rows`, the same in every figure."""
    return {opt: f"C{i % 10}" for i, opt in enumerate(dict.fromkeys(r["optimizer"] for r in rows))}


def loss_vs_lr(rows: list[dict]) -> Figure | None:
    """Final loss against learning rate per optimizer (as the Eve paper's Figure 2); diverged runs
    are drawn as crosses at the top edge."""
    rows = [r for r in rows if isinstance(r.get("lr"), float)]
    if not rows:
        return None
    key = loss_column(rows)
    finite = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
    with _style():
        fig = _new(6.5, 4.2)
        ax = fig.add_subplot()
        top = max(finite) * 1.05 if finite else 1.0
        for opt, color in _optimizer_colors(rows).items():
            mine = sorted((r for r in rows if r["optimizer"] == opt), key=lambda r: r["lr"])
            ok = [(r["lr"], r[key]) for r in mine if r.get("status") != "diverged"
                  and isinstance(r.get(key), float) and math.isfinite(r[key])]
            if ok:
                ax.plot(*zip(*ok), marker="o", lw=1.4, color=color, label=opt)
            bad = [r["lr"] for r in mine if r.get("status") == "diverged"]
            if bad:
                ax.scatter(bad, [top] * len(bad), marker="x", color=color, s=45,
                           label=None if ok else f"{opt} (diverged)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(_plain_labels())
        ax.xaxis.set_minor_formatter(_plain_labels(minor=True))
        ax.set_xlabel("learning rate")
        ax.set_ylabel(key.replace("_", " "))
        ax.legend(fontsize=8)
        return _encode(fig, "fig-loss-lr", "Final loss against learning rate",
                       f"{key.replace('_', ' ')} per optimizer; × at the top: diverged (NaN/inf).",
                       "final loss against learning rate per optimizer")


def best_lr_curves(rows: list[dict], curves: list[dict], column: str = "train_loss") -> Figure | None:
    """Training loss at each optimizer's best learning rate (as the Eve paper's Figure 3), as a
    moving average over ~1/40 of the run; with ``column="distance_to_adamw"``, every optimizer's
    distance to AdamW's weights at AdamW's best learning rate (as the Adam-mini paper's Figure 16)."""
    best = best_learning_rates(rows)
    distance = column == "distance_to_adamw"
    if distance and "adamw" in best:
        best = {opt: best["adamw"] for opt in dict.fromkeys(r["optimizer"] for r in rows) if opt != "adamw"}
    lines = {}
    for opt, lr in best.items():
        pts = sorted((c["step"], c[column]) for c in curves if c["optimizer"] == opt and c["lr"] == lr
                     and isinstance(c.get(column), float) and math.isfinite(c[column]))
        if pts:
            lines[(opt, lr)] = pts
    if not lines:
        return None
    window = 1 if distance else max(1, max(len(p) for p in lines.values()) // 40)
    colors = _optimizer_colors(rows)
    with _style():
        fig = _new(6.5, 4.2)
        ax = fig.add_subplot()
        for (opt, lr), pts in lines.items():
            steps, values = np.array(pts).T
            if window > 1 and len(values) >= window:
                values = np.convolve(values, np.ones(window) / window, mode="valid")
                steps = steps[window - 1:]
            ax.plot(steps, values, lw=1.3, marker="o" if distance else None, ms=3, label=f"{opt} (lr {lr:g})",
                    color=colors[opt])
        ax.set_xlabel("step")
        ax.set_ylabel(column.replace("_", " "))
        if not distance:
            _log_y(ax)
        ax.legend(fontsize=8)
        if distance:
            return _encode(fig, "fig-distance-to-adamw", "Distance to AdamW's weights",
                           "Euclidean distance of all weights to AdamW's at the same step, every optimizer at "
                           "AdamW's best learning rate, from the same start and batches.",
                           "distance to AdamW's weights over training")
        smooth = f", moving average over {window} steps" if window > 1 else ""
        return _encode(fig, "fig-train-loss", "Loss at the best learning rate",
                       f"Training loss at each optimizer's best learning rate{smooth}.",
                       "training loss over steps at each optimizer's best learning rate")


def best_learning_rates(rows: list[dict]) -> dict[str, float]:
    """The learning rate of each optimizer's lowest final (held-out if recorded) loss."""
    key = loss_column(rows)
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        loss = r.get(key)
        if r.get("status") == "diverged" or not isinstance(loss, float) or not math.isfinite(loss):
            continue
        if r["optimizer"] not in best or loss < best[r["optimizer"]][0]:
            best[r["optimizer"]] = (loss, r["lr"])
    return {opt: lr for opt, (_, lr) in best.items()}
