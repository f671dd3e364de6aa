"""A run folder read back: whatever files an analysis left, so a report can be rebuilt without
retraining, also after an interrupted run.

Files (all optional, but at least one of ``plan.json``, ``snr.csv``/``snr.csv.part`` and
``compare.csv``):

==========================  =====================================================================
``plan.json``               the plan (`lowmem.compress.Plan`, schema ``lowmem.plan/2``)
``layers.json``             `ModelLayers.to_json` plus ``"model"``: the plan's model record. Written
                            before the first training step, so a killed run still has it.
``snr.csv``                 the SNR trajectory; ``snr.csv.part`` when the run was killed
``precision.csv``           the error each state format caused (`lowmem.snr.precision`);
                            ``precision.csv.part`` when the run was killed; absent in folders
                            from before it was measured (their plans keep fp32 state)
``memory.json``             `MemoryEstimate.to_json`: AdamW, each preset, AdaMeM, the plan
``peak.json``               `PeakReport.to_json`: the traced peak of one training step per
                            optimizer (and the largest micro-batch under a budget)
``hessian.json``            ``lowmem-analyze hessian``'s document, here or in ``hessian/``
``compare.csv``             one row per (optimizer, learning rate) training run, here or in
                            ``compare/``: `COMPARE_COLUMNS` (more columns are kept, not required)
``curves.csv``              beside ``compare.csv``: `CURVE_COLUMNS`, one row per run and logged step
``validate/compare.csv``    ``--validate``'s runs (AdamW and the plan), read when there is no
                            other ``compare.csv``
==========================  =====================================================================

Without ``plan.json`` but with ``layers.json`` and a trajectory (a run killed before it wrote
its plan), the plan is rebuilt from the trajectory (and the precision measurements) with the
default thresholds and said so.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lowmem.compress.builders import build_plan, is_candidate
from lowmem.compress.memory import MemoryEstimate, MemoryRow, plan_state_bytes, plan_state_memory
from lowmem.compress.peak import PeakReport
from lowmem.compress.plan import Plan, PlanError, plan_digest
from lowmem.compress.precision import PRECISION_THRESHOLD
from lowmem.layers import ModelLayers, ParamInfo, normalize_name
from lowmem.snr.keys import ViewLabel
from lowmem.snr.precision import PrecisionTrajectory, WorstError, read_precision
from lowmem.snr.trajectory import SeriesKey, SnrTrajectory, TrajectoryError, read_trajectory
from lowmem.snr.views import param_views, subset_words

COMPARE_COLUMNS = ("optimizer", "lr", "status", "steps_done", "final_train_loss", "final_val_loss",
                   "state_bytes", "step_seconds")
CURVE_COLUMNS = ("optimizer", "lr", "step", "train_loss", "val_loss", "distance_to_adamw")

def loss_column(rows: list[dict]) -> str:
    """The final loss a comparison ranks by: ``final_val_loss`` when any run has a held-out
    loss, else ``final_train_loss``."""
    return "final_val_loss" if any(isinstance(r.get("final_val_loss"), float) for r in rows) else "final_train_loss"


_PART_ROLE = {"q": "attn_q", "k": "attn_k", "v": "attn_v"}


class RunFolderError(ValueError):
    """A run folder that cannot be reported: missing, empty or with an unreadable file."""


@dataclass
class HessianBlock:
    """One block of ``hessian.json``: its record and the array files found beside it."""

    record: dict
    matrix: Path | None = None       # BLOCK.npy, the d × d Hessian
    eigenvalues: Path | None = None  # BLOCK.eigvals.npy, ascending


@dataclass
class Run:
    """Everything a report shows, read from a run folder (see the module docstring)."""

    folder: Path
    plan: Plan | None = None
    layers: ModelLayers | None = None
    model: dict | None = None
    trajectory: SnrTrajectory | None = None
    trajectory_path: Path | None = None
    precision: PrecisionTrajectory | None = None
    precision_path: Path | None = None
    memory: MemoryEstimate | None = None
    hessian: dict | None = None
    hessian_blocks: list[HessianBlock] = field(default_factory=list)
    compare: list[dict] = field(default_factory=list)
    compare_path: Path | None = None
    compare_settings: dict = field(default_factory=dict)   # settings.json beside compare.csv
    peak: PeakReport | None = None
    curves: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``complete``, ``interrupted``, ``nonfinite_loss``, ``preset``, … as the run recorded it."""
        if self.trajectory_path is not None and self.trajectory_path.suffix == ".part":
            return "interrupted"
        source = self.plan.source if self.plan else {}
        if source.get("method") == "preset":
            return "preset"
        return source.get("status", "complete")

    def precision_by_layer(self) -> dict[str, dict[tuple[str, str], WorstError]] | None:
        """The worst error of each state format per layer over the plan's window (None without
        precision measurements)."""
        if self.precision is None:
            return None
        w = (self.plan.source if self.plan else {}).get("window")
        return self.precision.by_layer(tuple(w) if isinstance(w, list) and len(w) == 2 else None)

    @property
    def model_name(self) -> str:
        record = self.model or (self.plan.model if self.plan else {}) or {}
        return str(record.get("class", "model"))

    @property
    def parameters(self) -> int | None:
        record = self.model or (self.plan.model if self.plan else {}) or {}
        return record.get("parameters")

    def memory_rows(self) -> list[MemoryRow]:
        """Optimizer-state rows: ``memory.json``'s, else AdamW vs the plan from the plan alone."""
        if self.memory is not None:
            return list(self.memory.rows)
        if self.plan is None:
            return []
        mem = plan_state_memory(self.plan)
        half = mem.adamw_bytes // 2
        m, v = plan_state_bytes(self.plan)
        return [MemoryRow("adamw", half, half, mem.adamw_bytes, 0.0, 0.0),
                MemoryRow("plan", m, v, mem.plan_bytes, 1 - v / half if half else 0.0, mem.saved)]

    def decisions(self) -> list["Decision"]:
        """The decision table's rows from what the folder holds (`decision_rows`); the loss gap of
        ``plan`` only where the runs trained this folder's plan."""
        compare = self.compare if self.trained_this_plan() else [r for r in self.compare
                                                                  if not str(r.get("optimizer")).startswith("plan")]
        return decision_rows(self.peak, self.memory_rows(), compare)

    def trained_this_plan(self) -> bool:
        """Whether the runs in `compare` trained ``plan.json`` (False: another plan, by its digest)."""
        trained = str(self.compare_settings.get("slimadam", ""))
        return self.plan is None or not trained.startswith("plan sha256:") or trained == plan_digest(self.plan)


def read_run(folder: str | os.PathLike) -> Run:
    """Read what a run left in `folder`.

    Raises:
        RunFolderError: the folder is missing or holds neither a plan nor a trajectory, a file in
            it is unreadable (the message names the file), or ``plan.json`` and ``layers.json``
            describe different models (both are named, with the parameters that differ).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"{folder} is not a folder; give the --out folder of a lowmem-analyze run")
    run = Run(folder)
    _read_layers(run)
    plan_path = folder / "plan.json"
    if plan_path.exists():
        try:
            run.plan = Plan.load(plan_path)
        except PlanError as e:
            raise RunFolderError(str(e)) from None
        except OSError as e:
            raise RunFolderError(f"{plan_path}: {e.strerror or e}") from None
        if run.layers is not None:
            _check_same_model(run, plan_path)
    path = _streamed(folder, "snr.csv")
    if path is not None:
        try:
            run.trajectory = SnrTrajectory(read_trajectory(path))
        except (TrajectoryError, OSError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{path}: {e}") from None
        run.trajectory_path = path
        if path.suffix == ".part":
            run.notes.append(f"{path.name}: the run did not finish; its {len(run.trajectory.steps)} "
                             "measurement(s) are shown")
    path = _streamed(folder, "precision.csv")
    if path is not None:
        try:
            run.precision = PrecisionTrajectory(read_precision(path))
        except (TrajectoryError, OSError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{path}: {e}") from None
        run.precision_path = path
    _read_compare(run)
    if run.plan is None and run.trajectory is None and not run.compare:
        raise RunFolderError(f"{folder} holds no plan.json, snr.csv or compare.csv: nothing to report "
                             f"(is it the --out folder of a lowmem-analyze run?)")
    if run.plan is None and run.layers is not None and run.model is not None and run.trajectory and run.trajectory.samples:
        try:
            run.plan = build_plan(run.model, run.trajectory, layers=run.layers,
                                  source={"status": "interrupted", "rebuilt_by": "report"}, precision=run.precision)
        except PlanError as e:   # e.g. a trajectory of another model than layers.json's
            raise RunFolderError(f"{run.trajectory_path}: no plan can be rebuilt from it with "
                                 f"{folder / 'layers.json'}: {e}") from None
        measured = run.precision is not None and run.precision.samples
        run.notes.append("no plan.json: plan rebuilt from the trajectory (threshold 1.0, all measured steps"
                         + (f"; state formats below {PRECISION_THRESHOLD:.0%} update error)" if measured else
                            "; no precision measurement: fp32 state)"))
    elif run.plan is None and run.trajectory is not None:
        run.notes.append("no plan.json and no layers.json: SNR shown, no plan")
    if run.layers is None and (run.plan is not None or run.trajectory is not None):
        run.layers = _layers_from_files(run)
    memory_path = folder / "memory.json"
    if memory_path.exists():
        try:
            run.memory = MemoryEstimate.from_json(_json(memory_path))
        except ValueError as e:
            raise RunFolderError(f"{memory_path}: {e}") from None
    peak_path = folder / "peak.json"
    if peak_path.exists():
        try:
            run.peak = PeakReport.from_json(_json(peak_path))
        except ValueError as e:
            raise RunFolderError(f"{peak_path}: {e}") from None
    _read_hessian(run)
    if run.compare and not run.trained_this_plan():
        run.notes.append(f"{run.compare_path} trained another plan than plan.json: the plan's runs are shown "
                         "there, not as its loss gap in the decision table")
    return run


def _streamed(folder: Path, name: str) -> Path | None:
    """`name` or ``name.part``: a run streams into the .part file and renames it at its end; when
    both exist (a run killed in a folder an earlier run finished in), the newer one is this
    folder's last run."""
    paths = [p for p in (folder / name, folder / f"{name}.part") if p.is_file()]
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path}: not readable JSON ({e})") from None


def _read_layers(run: Run) -> None:
    path = run.folder / "layers.json"
    if not path.exists():
        return
    doc = _json(path)
    try:
        run.layers = ModelLayers.from_json(doc)
    except ValueError as e:
        raise RunFolderError(f"{path}: {e}") from None
    model = doc.get("model")
    if model is not None and not (isinstance(model, dict) and isinstance(model.get("fingerprint"), str)):
        raise RunFolderError(f"{path}: 'model' must be the plan's model record, found {model!r:.80}")
    run.model = model


def _check_same_model(run: Run, plan_path: Path) -> None:
    """Refuse a plan.json whose parameters (names and shapes) are not those of layers.json: a
    report of the two together would show one model's decisions against another's layers."""
    ours = {normalize_name(n): list(lp.shape) for n, lp in run.plan.layers.items()}
    theirs = {info.name: list(info.shape) for info in run.layers}
    if ours == theirs:
        return   # same parameters: a fingerprint that differs (edited by hand) does not matter
    differ = [f"{n} (plan {ours[n]}, layers {theirs[n]})" for n in ours if n in theirs and ours[n] != theirs[n]]
    only_plan = [n for n in ours if n not in theirs]
    only_layers = [n for n in theirs if n not in ours]
    problems = [f"{what}: {_first(items)}" for what, items in (
        ("different shapes", differ), ("only in plan.json", only_plan), ("only in layers.json", only_layers)) if items]
    raise RunFolderError(
        f"{plan_path} and {run.folder / 'layers.json'} describe different models: the plan is for "
        f"{_model_words(run.plan.model)}, layers.json for {_model_words(run.model)}; " + "; ".join(problems)
        + ". Keep each run in its own folder (remove the file that is not this run's).")


def _model_words(record: dict | None) -> str:
    if not record:
        return "a model it does not record"
    n = record.get("parameters")
    size = f" with {n:,} parameters" if isinstance(n, int) else ""
    return f"{record.get('class', '?')}{size} ({str(record.get('fingerprint', '?'))[:19]}…)"


def _first(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" … ({len(items) - n} more)" if len(items) > n else "")


def _layers_from_files(run: Run) -> ModelLayers:
    """Parameters known from the plan or the trajectory, their axes unknown (``d0``, ``d1``, …):
    subsets then read as dims, and head views are left out."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    if run.plan is not None:
        shapes = {n: (tuple(lp.shape), lp.role) for n, lp in run.plan.layers.items()}
    elif run.trajectory is not None:
        for s in run.trajectory.samples:
            shapes.setdefault(s.name, (s.shape, "other"))
    run.notes.append("no layers.json: axes are shown as dims d0, d1, … (an embedding's as token, model)")
    return ModelLayers({n: ParamInfo(n, (n,), shape, role, _axes_from_role(role, shape), "?")
                        for n, (shape, role) in shapes.items()})


def _axes_from_role(role: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    # Only an embedding's axes follow from its role alone (nn.Embedding is (token, model)); a
    # matrix may be a Linear (out, in) or a transposed HF Conv1D (in, out), so it stays generic.
    if role == "embedding" and len(shape) == 2:
        return ("token", "model")
    return tuple(f"d{i}" for i in range(len(shape)))


def _read_hessian(run: Run) -> None:
    for where in (run.folder, run.folder / "hessian"):
        path = where / "hessian.json"
        if not path.exists():
            continue
        doc = _json(path)
        if not isinstance(doc, dict) or doc.get("schema") != "lowmem.hessian/1":
            raise RunFolderError(f"{path}: expected schema 'lowmem.hessian/1'")
        blocks = doc.get("blocks", [])
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks) \
                or not all(isinstance(b.get("files") or {}, dict) for b in blocks):
            raise RunFolderError(f"{path}: 'blocks' must be a list of block records")
        run.hessian = doc
        for record in blocks:
            files = record.get("files") or {}
            run.hessian_blocks.append(HessianBlock(record, _beside(where, files.get("npy")),
                                                   _beside(where, files.get("eigvals"))))
        return


def _beside(folder: Path, recorded: str | None) -> Path | None:
    """A file the document names, looked up beside the document first (the folder may have moved)."""
    if not recorded:
        return None
    for candidate in (folder / Path(recorded).name, Path(recorded)):
        if candidate.exists():
            return candidate
    return None


def _read_compare(run: Run) -> None:
    for where in (run.folder, run.folder / "compare", run.folder / "validate"):
        path = where / "compare.csv"
        if not path.exists():
            continue
        run.compare = _typed_rows(path, COMPARE_COLUMNS, required=("lr",))
        run.compare_path = path
        with contextlib.suppress(OSError, ValueError):
            settings = json.loads((where / "settings.json").read_text())
            run.compare_settings = settings if isinstance(settings, dict) else {}
        curves = where / "curves.csv"
        if curves.exists():
            run.curves = _typed_rows(curves, CURVE_COLUMNS, required=("lr", "step"))
        return


def read_compare_csv(path: str | os.PathLike) -> list[dict]:
    """A sweep's ``compare.csv`` (a file, or the folder holding it): one dict per run, numbers as
    floats.

    Raises:
        RunFolderError: no such file, or one that is not a sweep's.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "compare.csv"
    if not path.is_file():
        raise RunFolderError(f"{path}: no such file (a compare run writes compare.csv in its --out folder)")
    return _typed_rows(path, COMPARE_COLUMNS, required=("lr",))


def best_loss_gaps(rows: list[dict]) -> dict[str, float]:
    """Each optimizer's best final loss over its learning rates (held-out where the sweep has it;
    diverged runs left out) minus AdamW's best: the cost in loss of choosing it, tuned as well as
    the sweep tuned AdamW. Empty without a finished AdamW run."""
    column = loss_column(rows)
    best: dict[str, float] = {}
    for r in rows:
        value = r.get(column)
        if r.get("status") == "complete" and isinstance(value, float):
            best[r["optimizer"]] = min(best.get(r["optimizer"], value), value)
    if "adamw" not in best:
        return {}
    return {name: loss - best["adamw"] for name, loss in best.items()}


@dataclass(frozen=True)
class Decision:
    """One candidate optimizer of the decision table: its state bytes, the peak of a training step
    with it, the largest micro-batch within the budget (None: no budget or not traced) and its
    loss gap to AdamW (None: not trained)."""

    name: str
    state: int | None
    peak: int | None = None
    fits: int | None = None
    loss_gap: float | None = None
    error: str | None = None           # why its peak could not be traced

    def to_json(self) -> dict:
        return {"optimizer": self.name, "state_bytes": self.state, "peak_bytes": self.peak,
                "largest_batch": self.fits, "loss_gap": self.loss_gap, "error": self.error}


def measured_states(compare: list[dict]) -> dict[str, int]:
    """Each optimizer's state bytes as a sweep measured them from the live optimizer (the largest
    over its runs), by name."""
    measured: dict[str, int] = {}
    for r in compare:
        if isinstance(r.get("state_bytes"), (int, float)):
            measured[r["optimizer"]] = max(measured.get(r["optimizer"], 0), int(r["state_bytes"]))
    return measured


def decision_rows(peak: PeakReport | None, memory: list[MemoryRow], compare: list[dict]) -> list[Decision]:
    """What a user decides between: every optimizer with a traced peak (`peak`'s rows, in its
    order), else every row of the state estimate `memory`, then those trained in `compare` (a
    sweep's or ``--validate``'s rows) that neither has. State bytes: the traced state (the live
    optimizer's, step counters included), else the estimate from shapes, else the largest
    measured in the sweep; loss gap: `best_loss_gaps` of `compare`."""
    gaps = best_loss_gaps(compare) if compare else {}
    estimated = {r.name: r.total_bytes for r in memory}
    measured = measured_states(compare)
    rows = []
    if peak is not None:
        for r in peak.rows:
            m = r.memory
            rows.append(Decision(r.name, m.state if m else estimated.get(r.name, measured.get(r.name)),
                                 m.peak if m else None, r.fits, gaps.get(r.name), r.error))
    else:
        rows = [Decision(r.name, r.total_bytes, loss_gap=gaps.get(r.name)) for r in memory]
    shown = {r.name for r in rows}
    rows += [Decision(name, measured.get(name), loss_gap=gaps.get(name))
             for name in dict.fromkeys(r["optimizer"] for r in compare) if name not in shown]
    return rows


def gap_words(rows: list[dict]) -> tuple[str, str | None]:
    """The loss a comparison's gaps are in (``held-out loss`` or ``training loss``) and where they
    come from, in words (None without rows): the steps, and the learning rate or how many."""
    if not rows:
        return "held-out loss", None
    held_out = loss_column(rows) == "final_val_loss"
    lrs = sorted({float(r["lr"]) for r in rows if isinstance(r.get("lr"), (int, float))})
    steps = max((int(r["steps_done"]) for r in rows if isinstance(r.get("steps_done"), (int, float))), default=None)
    where = f"{steps:,} steps" if steps is not None else "runs"
    where += f" at lr {lrs[0]:g}, one run each" if len(lrs) == 1 else f", the best of {len(lrs)} learning rates"
    return ("held-out loss" if held_out else "training loss"), where


def _csv_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise RunFolderError(f"{path}: missing column(s) {', '.join(missing)}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RunFolderError(f"{path}: {e}") from None


_TEXT_COLUMNS = ("optimizer", "status")


def _typed_rows(path: Path, columns: tuple[str, ...], required: tuple[str, ...]) -> list[dict]:
    """Rows with the numbers of `columns` as floats (an empty cell: None, except in `required`);
    other columns stay text. A cell that is not a number names its file, line and column."""
    rows = []
    for line, row in enumerate(_csv_rows(path, columns), start=2):
        out = dict(row)
        for k in columns:
            if k in _TEXT_COLUMNS:
                continue
            v = (row.get(k) or "").strip()
            if v == "" and k not in required:
                out[k] = None
                continue
            try:
                out[k] = float(v)
            except ValueError:
                raise RunFolderError(f"{path}: line {line}: column {k} must be a number, found {v!r}") from None
        rows.append(out)
    return rows


# -- SNR per layer, the figures' common input ----------------------------------------------------


@dataclass
class SubsetSnr:
    """One candidate axis subset of one layer: its time-mean SNR and its trajectory."""

    words: str                 # "fan_in", "fan_out per head", …
    mean: float
    steps: list[int]
    values: list[float]
    view: ViewLabel | None = None      # the trajectory's view and subset this comes from
    subset: tuple[int, ...] = ()


@dataclass
class LayerSnr:
    """The candidate subsets of one parameter (or one part of a fused projection)."""

    label: str                 # the parameter name, with " [q]" for a fused projection's part
    name: str
    role: str                  # a part's own role (attn_q for the q part of c_attn)
    depth: int                 # index among the layers of the same role, in model order
    subsets: dict[str, SubsetSnr]


def layer_snr(layers: ModelLayers, trajectory: SnrTrajectory,
              window: tuple[int | None, int | None] | None = None) -> list[LayerSnr]:
    """Per parameter (and fused part), the SNR of every subset a plan may average over.

    The time mean is over `window` (the plan's); the trajectories hold every measured step.
    Subsets that are no plan candidates (over heads or tokens) are left out, as in the plan.
    """
    means = trajectory.time_mean(window)
    series: dict[SeriesKey, tuple[list[int], list[float]]] = {}
    for s in sorted(trajectory.samples, key=lambda s: s.step):
        steps, values = series.setdefault((s.name, s.view, s.subset), ([], []))
        steps.append(s.step)
        values.append(s.snr if math.isfinite(s.snr) else float("nan"))
    out: list[LayerSnr] = []
    depth: dict[str, int] = {}
    for info in layers:
        rows: dict[str, LayerSnr] = {}
        for view in param_views(info):
            for dims in _all_subsets(len(view.shape)):
                key = (info.name, view.label(), dims)
                if key not in means or not is_candidate(view, dims):
                    continue
                part = view.part
                label = info.name if part is None else f"{info.name} [{part}]"
                if label not in rows:
                    role = _PART_ROLE.get(part, info.role) if part else info.role
                    rows[label] = LayerSnr(label, info.name, role, 0, {})
                words = subset_words(view, dims)
                if words not in rows[label].subsets:   # a raw view's words win over an equal head view's
                    rows[label].subsets[words] = SubsetSnr(words, means[key].snr, *series[key], key[1], key[2])
        for row in rows.values():
            row.depth = depth.get(row.role, 0)
            depth[row.role] = row.depth + 1
            out.append(row)
    return out


def _all_subsets(n: int) -> list[tuple[int, ...]]:
    return [tuple(d for d in range(n) if mask >> d & 1) for mask in range(1, 1 << n)]
