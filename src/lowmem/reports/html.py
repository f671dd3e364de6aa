"""The self-contained HTML report of a run folder (DESIGN §8).

One file: jinja2 with autoescape, CSS and a little JavaScript inline, figures as base64 PNG, no
external link of any kind, and the plan embedded as ``<script type="application/json"
id="lowmem-plan">`` so a machine can read it back. Sections: summary (memory per optimizer),
plan table, the storage format of each layer's optimizer state, SNR heatmap, SNR against depth, SNR trajectories (a few layers as figures, every
layer in an inline viewer), and, when the folder has them, Hessian blocks and the comparison of
optimizers across learning rates.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

import jinja2
import numpy as np
from markupsafe import Markup, escape

from lowmem.compress.memory import format_bytes
from lowmem.compress.plan import write_atomic
from lowmem.reports import figures
from lowmem.reports.run import Run, gap_words, layer_snr, loss_column
from lowmem.compress.precision import ADAMW_BYTES_PER_PARAMETER, plan_bytes_per_parameter
from lowmem.reports.terminal import (STATE_COLUMNS, batch_words, best_measured, decision_words, error_text, peak_settings, shape_text,
                                     state_rows)
from lowmem.snr.keys import format_subset

ROLE_ORDER = ("embedding", "attn_qkv", "attn_q", "attn_k", "attn_v", "attn_out", "mlp_up", "mlp_gate", "mlp_down",
              "router", "lm_head", "conv", "norm", "bias", "other")


def script_json(value) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` as \\u escapes (the same
    document to a JSON parser; the HTML parser cannot see a closing tag in it)."""
    text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("lowmem.reports", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["bytes"] = format_bytes
    env.filters["error"] = error_text
    env.filters["dotbreak"] = _dotbreak
    env.filters["script_json"] = lambda v: Markup(script_json(v))
    return env


def _dotbreak(name: str):
    """An escaped parameter name that may wrap only after its dots (never inside a component)."""
    return Markup(".<wbr>").join(escape(part) for part in str(name).split("."))


def _threshold(run: Run) -> float:
    t = (run.plan.source if run.plan else {}).get("threshold")
    return float(t) if isinstance(t, (int, float)) else 1.0


def _window(run: Run):
    w = (run.plan.source if run.plan else {}).get("window")
    return tuple(w) if isinstance(w, list) and len(w) == 2 else None


def _plan_groups(run: Run) -> list[dict]:
    """Plan rows grouped by role, roles in `ROLE_ORDER`, layers in model order within a role."""
    if run.plan is None:
        return []
    groups: dict[str, list[dict]] = {}
    for name, lp in run.plan.layers.items():
        best, snr = best_measured(name, lp, run.layers)
        groups.setdefault(lp.role, []).append({
            "name": name, "role": lp.role, "shape": shape_text(lp.shape), "numel": lp.numel,
            "decision": decision_words(lp, run.layers, name), "compressed": lp.compressed,
            "best": best, "snr": snr if snr is not None and math.isfinite(snr) else None,
            "why": lp.why if not lp.parts else "; ".join(f"{p.name}: {p.why}" for p in lp.parts),
            "v_kept": lp.v_kept, "aliases": list(lp.aliases)})
    rank = {r: i for i, r in enumerate(ROLE_ORDER)}
    return [{"role": role, "rows": rows, "kept": sum(r["v_kept"] for r in rows), "numel": sum(r["numel"] for r in rows),
             "compressed": sum(r["compressed"] for r in rows)}
            for role, rows in sorted(groups.items(), key=lambda kv: rank.get(kv[0], len(rank)))]


def _state_section(run: Run) -> dict | None:
    """Per layer the formats of `m` and `v`, bytes per parameter and the worst update error of
    each format; None without a plan, or when it says nothing of formats and nothing was measured."""
    if run.plan is None or (run.precision is None and all(lp.state is None for lp in run.plan.layers.values())):
        return None
    rows = state_rows(run.plan, run.precision_by_layer())
    for r in rows:
        r["errors"] = [None if w is None else w.update_error for w in r["errors"]]
    threshold = run.plan.source.get("precision_threshold")
    return {"rows": rows, "columns": [f"{w} {f}" for w, f in STATE_COLUMNS],
            "bytes_per_param": plan_bytes_per_parameter(run.plan), "adamw_bytes_per_param": ADAMW_BYTES_PER_PARAMETER,
            "threshold": threshold if isinstance(threshold, (int, float)) else None,
            "measured": run.precision is not None}


def _viewer_data(layers, threshold: float) -> dict:
    def clean(v):
        return [None if not math.isfinite(x) else float(f"{x:.4g}") for x in v]

    return {"threshold": threshold,
            "layers": [{"label": l.label, "role": l.role,
                        "subsets": [{"words": s.words, "view": "" if s.view is None else str(s.view),
                                     "subset": format_subset(s.subset), "steps": s.steps,
                                     "values": clean(s.values)}
                                    for s in l.subsets.values()]} for l in layers if l.subsets]}


def _hessian_section(run: Run) -> dict | None:
    if run.hessian is None:
        return None
    blocks = []
    for i, b in enumerate(run.hessian_blocks):
        r = b.record
        pooled = eig = None
        if r.get("status") == "done":
            try:
                pooled = figures.pooled_abs(b.matrix, shape=r.get("shape"), out_axis=r.get("out_axis", 0)) \
                    if b.matrix else None
                eig = np.load(b.eigenvalues) if b.eigenvalues else None
            except (OSError, ValueError) as e:   # a file cut short by a killed run: show the numbers only
                run.notes.append(f"{b.matrix or b.eigenvalues}: not readable ({e}); figure left out")
                pooled = eig = None
            if eig is None and pooled is not None and b.matrix and (r.get("size") or 0) <= 2048:
                eig = np.linalg.eigvalsh(np.load(b.matrix))
        head = (r.get("mass") or {}).get("per head")
        spec = r.get("spectrum") or {}
        blocks.append({"block": r.get("block", "?"), "size": r.get("size"), "status": r.get("status"),
                       "reason": r.get("reason"), "label": (r.get("class") or {}).get("label"),
                       "why": (r.get("class") or {}).get("why"),
                       "head_mass": head and head.get("inside"), "head_baseline": head and head.get("baseline"),
                       "groups": (r.get("found") or {}).get("groups"), "lambda_max": spec.get("lambda_max"),
                       "condition": spec.get("condition"), "null_count": spec.get("null_count"),
                       "figure": figures.hessian_block(r, pooled, eig, i)})
    return {"settings": run.hessian.get("settings", {}), "status": run.hessian.get("status"), "blocks": blocks}


def _compare_section(run: Run) -> dict | None:
    """Optimizer × learning rate: each cell the final loss and its gap to AdamW at that lr."""
    if not run.compare:
        return None
    best = figures.best_learning_rates(run.compare)
    key = loss_column(run.compare)
    adamw = {r["lr"]: r.get(key) for r in run.compare if r["optimizer"] == "adamw" and r.get("status") != "diverged"}
    lrs = sorted({r["lr"] for r in run.compare})
    rows = []
    for opt in dict.fromkeys(r["optimizer"] for r in run.compare):
        mine = {r["lr"]: r for r in run.compare if r["optimizer"] == opt}
        cells = []
        for lr in lrs:
            r = mine.get(lr)
            if r is None:
                cells.append(None)
                continue
            loss, ref = r.get(key), adamw.get(lr)
            ok = r.get("status") != "diverged" and isinstance(loss, float) and math.isfinite(loss)
            gap = loss - ref if ok and isinstance(ref, float) and opt != "adamw" else None
            cells.append({"loss": loss if ok else None, "gap": gap, "diverged": not ok, "best": best.get(opt) == lr})
        states = [r["state_bytes"] for r in mine.values() if isinstance(r.get("state_bytes"), float)]
        times = sorted(r["step_seconds"] for r in mine.values() if isinstance(r.get("step_seconds"), float))
        rows.append({"optimizer": opt, "cells": cells, "best_lr": best.get(opt),
                     "state": int(max(states)) if states else None,
                     "step": times[len(times) // 2] if times else None})
    figs = [figures.loss_vs_lr(run.compare), figures.best_lr_curves(run.compare, run.curves),
            figures.best_lr_curves(run.compare, run.curves, "distance_to_adamw")]
    return {"lrs": lrs, "rows": rows, "key": key.replace("_", " "), "runs": len(run.compare),
            "figures": [f for f in figs if f is not None]}


def _decision_section(run: Run) -> dict | None:
    """The decision table (`Run.decisions`) with the columns something measured."""
    rows = run.decisions()
    if not rows:
        return None
    adamw = next((r.peak for r in rows if r.name == "adamw" and r.peak), None)
    loss_name, source = gap_words(run.compare)
    peak = run.peak
    return {"rows": [{**r.to_json(), "vs_adamw": r.peak / adamw - 1 if r.peak and adamw else None} for r in rows],
            "traced": any(r.peak is not None for r in rows), "adamw": adamw is not None,
            "budget": peak.budget if peak is not None else None, "settings": peak_settings(peak) if peak else None,
            "gaps": any(r.loss_gap is not None for r in rows), "loss_name": loss_name, "gap_source": source,
            "untraced": [r.name for r in rows if r.error and r.peak is None],
            "notes": [f"{r.name}: {r.error}" for r in rows if r.error and r.peak is not None],
            "batches": {r.name: batch_words(r.fits) for r in rows if r.fits is not None}}


def render_report(run: Run) -> str:
    """The report of `run` as one HTML document."""
    threshold = _threshold(run)
    snr_layers = layer_snr(run.layers, run.trajectory, _window(run)) if run.trajectory and run.layers else []
    memory_rows = run.memory_rows()
    adamw = next((r for r in memory_rows if r.name == "adamw"), None)
    plan_row = next((r for r in memory_rows if r.name == "plan"), None)
    summary = None
    if run.plan is not None:
        p = run.plan
        summary = {"v_full": p.v_full, "v_kept": p.v_kept, "v_saved": 1 - p.v_kept / p.v_full if p.v_full else 0.0,
                   "adamw_bytes": adamw.total_bytes if adamw else None,
                   "plan_bytes": plan_row.total_bytes if plan_row else None,
                   "state_saved": plan_row.total_saved if plan_row else None,
                   "compressed": sum(lp.compressed for lp in p.layers.values()), "layers": len(p.layers)}
    chosen = figures.chosen_layers(snr_layers)
    sections = {
        "memory": figures.memory_bars(memory_rows, run.model_name),
        "heatmap": figures.snr_heatmap(snr_layers, threshold),
        "depth": figures.snr_vs_depth(snr_layers, threshold),
        "trajectories": figures.snr_trajectories(chosen, threshold),
    }
    context = {
        "title": f"lowmem report: {run.model_name}",
        "run": run, "status": run.status, "model": run.model_name, "parameters": run.parameters,
        "source": run.plan.source if run.plan else {}, "summary": summary, "memory_rows": memory_rows,
        "plan_groups": _plan_groups(run), "state": _state_section(run), "threshold": threshold, "fig": sections,
        "steps": run.trajectory.steps if run.trajectory else [],
        "viewer": _viewer_data(snr_layers, threshold) if snr_layers else None,
        "hessian": _hessian_section(run), "compare": _compare_section(run), "decision": _decision_section(run),
        "plan_json": run.plan.to_json() if run.plan else None,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "notes": run.notes,
    }
    return _env().get_template("report.html.j2").render(**context)


def write_report(run: Run, path: str | os.PathLike | None = None) -> Path:
    """Render `run` and write it atomically (default ``report.html`` in the run folder)."""
    return write_atomic(Path(path) if path is not None else run.folder / "report.html", render_report(run))
