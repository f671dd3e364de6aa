"""`lowmem-analyze hessian`: exact Hessian blocks of a model's loss, their structure and spectra.

    lowmem-analyze hessian model.py [--block SELECTOR ...] [--at init|N] [--out DIR]
    lowmem-analyze hessian --example binary --format json > hessian.json

For each block (default: the Q, K and V of every attention layer, its output projection, and
the MLP's up, gate and down weights, each at most ``--max-entries`` entries) the exact Hessian
of the mean loss over the batches (`lowmem.hessian.block_hessian`, float64 by default), its
class (block-diagonal by heads or dense: Adam-mini's Class 1 / Class 2, `lowmem.hessian.classify`),
the share of ‖H‖²_F inside the per-head, per-row, per-column and found partitions against a
dense matrix's share, and its spectrum. The batches are a built-in example's whole ``dataset()``
when it has one, else ``get_batch(0 … N-1)`` (``--batches N``, default 1).

Written to ``--out`` as each block finishes, so an interrupted or failing run keeps what it
computed: ``BLOCK.npy`` (H, the piece flattened row-major as `block_hessian` returns it),
``BLOCK.eigvals.npy`` (its eigenvalues, ascending), ``BLOCK.png`` (a heatmap of |H|, log colour
scale, rows = output units) and ``hessian.json``
(every number; replaced atomically after each block). ``--plan-out`` writes a plan with one `v`
value per measured dense block (`lowmem.hessian.plan_from_partitions`).

Exit codes as ``lowmem-analyze`` (DESIGN §8): 0 done (blocks that failed are reported in the
table and the JSON); 2 usage error (bad flags or block selector, a missing file, every block
too large); 3 the user's code failed or broke the contract (or its loss is random in eval(), not
finite or without a gradient); 4 internal error; 130 interrupted (every finished block kept).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lowmem.cli.common import PROG, ArgumentParser, parse_device, positive_float, positive_int, run_guarded, seed_int, user_code
from lowmem.cli.contract import UsageError, load_example, load_task
from lowmem.compress.plan import model_record, write_atomic
from lowmem.examples import EXAMPLES
from lowmem.hessian import (HessianError, HessianTooLarge, LossFnError, Partition, Piece, RandomForwardError,
                            block_hessian, block_spectrum, candidate_partitions, classify, partition_mass, piece,
                            plan_from_partitions)
from lowmem.layers import ModelLayers, ParamInfo, resolve_layers
from lowmem.probe import DEFAULTS, NonFiniteLossError, Task, TaskError, build, to_device
from lowmem.reports.terminal import HessianRow, HessianTable
from lowmem.runfolder import PREVIOUS, FolderError, RunFolder, check_writable_file

NAME = f"{PROG} hessian"
SCHEMA = "lowmem.hessian/1"
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_OUT = "lowmem-out/hessian"
# Roles whose weights are the default blocks, in the order a layer's rows are listed.
_ATTN_ROLES = ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_out")
_MLP_ROLES = ("mlp_up", "mlp_gate", "mlp_down")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _at(text: str) -> int:
    if text == "init":
        return 0
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise argparse.ArgumentTypeError(f"expected 'init' or a number of training steps >= 0, got {text!r}")
    return steps


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=NAME,
        usage="%(prog)s [model.py | --example NAME] [--block SELECTOR ...] [--at init|N] [options]",
        description="Exact Hessian blocks of the loss (float64 by default): Adam-mini's class (block-diagonal "
                    "by heads, or dense), the share of the block's mass inside per-head / per-row / found "
                    "partitions against a dense matrix, eigenvalues; arrays, heatmaps and hessian.json in --out.",
        epilog="Block selectors: NAME, NAME[part=q] (one part of a fused Q/K/V weight), NAME[part=q, head=1], "
               "NAME[0:8] (rows 0-7), NAME[0:8, 0:4]. Default: the Q, K, V of every attention layer, its "
               "output projection and the MLP weights, up to --max-entries entries each. "
               "Exit codes: 0 done; 2 usage error (a bad selector, every block too large); 3 your code "
               "failed or broke the model.py contract; 4 internal error; 130 interrupted (finished blocks kept).",
    )
    p.add_argument("target", nargs="?", help="model.py or model.py:factory (the contract of lowmem-analyze)")
    p.add_argument("--example", choices=sorted(EXAMPLES), help="a built-in example instead of a model.py")
    p.add_argument("--block", action="append", metavar="SELECTOR", help="a block to compute (repeatable)")
    p.add_argument("--max-entries", type=positive_int, default=DEFAULT_MAX_ENTRIES, metavar="N",
                   help=f"default blocks larger than N entries are skipped (default {DEFAULT_MAX_ENTRIES:,}: "
                        "a 4,096 x 4,096 block)")
    p.add_argument("--at", type=_at, default=0, metavar="init|N",
                   help="Hessian at initialisation (default) or after N training steps on get_batch(0 … N-1)")
    p.add_argument("--lr", type=positive_float, help=f"learning rate of the AdamW that trains --at N steps "
                                                      f"(default LOWMEM['lr'] or {DEFAULTS['lr']:g})")
    p.add_argument("--batches", type=positive_int, metavar="N",
                   help="mean loss over get_batch(0 … N-1) (default: an example's whole dataset(), else 1)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float64", help="precision of the Hessian (default float64)")
    p.add_argument("--max-gib", type=positive_float, metavar="G",
                   help="refuse a block whose dense H exceeds G GiB (default: half the available memory)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, …")
    p.add_argument("--seed", type=seed_int, default=0, help="torch.manual_seed before build_model (default 0)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"folder for the arrays, heatmaps and hessian.json (default {DEFAULT_OUT})")
    p.add_argument("--format", choices=("table", "json"), default="table", help="stdout: a table or one JSON document")
    p.add_argument("--plan-out", metavar="FILE", help="write a plan with one v value per measured dense block")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or notes on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda err: _run(args, err), prog=NAME, quiet=args.quiet, debug=args.debug)


# -- blocks ------------------------------------------------------------------------------------


def default_blocks(layers: ModelLayers, max_entries: int) -> tuple[list[str], list[str]]:
    """Selectors of the default blocks, in model order, and notes on those skipped as too large.

    Per attention layer the Q, K, V parts (``NAME[part=q]`` … of a fused weight, or the separate
    weights) and the output projection; per MLP its up, gate and down weights."""
    chosen, skipped = [], []
    for info in layers:
        if info.role not in _ATTN_ROLES + _MLP_ROLES or len(info.shape) < 2:
            continue
        if info.role == "attn_qkv":
            if not info.parts:
                skipped.append(f"{info.name}: a fused Q/K/V weight whose parts are unknown; select rows with "
                               f"--block '{info.name}[0:N]'")
                continue
            groups = info.part_groups or 1   # an interleaved part has `size` rows in each group
            pieces = [(f"{info.name}[part={part}]", groups * size * info.numel // _out_size(info))
                      for part, size in info.parts]
        else:
            pieces = [(info.name, info.numel)]
        for selector, numel in pieces:
            if numel > max_entries:
                skipped.append(f"{selector}: {numel:,} entries > --max-entries {max_entries:,}")
            else:
                chosen.append(selector)
    return chosen, skipped


def _out_size(info: ParamInfo) -> int:
    return info.view_shape[info.fan_out_dims[0]] if info.fan_out_dims else info.view_shape[0]


def rows_first(p: Piece, info: ParamInfo) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    """(permutation, shape) that put the piece's output axis first, as `classify` reads rows; in a
    stack of experts the expert axis before it, the two as one axis of rows (expert, output unit),
    so that no row spans two experts. The permutation is None when the order already is that (an
    ``nn.Linear``; HF ``Conv1D`` is (in, out)). The piece's box is in `ParamInfo.view_shape`'s
    dims (`lowmem.hessian.piece`)."""
    shape = tuple(p.box)
    out = info.fan_out_dims[0] if info.fan_out_dims else 0
    expert = info.axes.index("expert") if "expert" in info.axes and len(shape) == len(info.axes) else None
    if len(shape) < 2 or (out == 0 and expert is None):
        return None, shape
    order = torch.arange(p.numel).view(shape)
    if expert is not None:
        order = order.movedim((expert, out), (0, 1)).reshape(shape[expert] * shape[out],
                                                              *(s for d, s in enumerate(shape) if d not in (expert, out)))
    else:
        order = order.movedim(out, 0)
    return order.reshape(-1), tuple(order.shape)


def heads_of(p: Piece, info: ParamInfo) -> int | None:
    """Attention heads along the piece's output axis: its rows hold whole heads of width head_dim
    (`lowmem.layers`; a fused part's head width is its size over ``part_heads``; interleaved parts
    without one `head_dim`, MLA's keys and values, each their own)."""
    head_dim = info.head_dim
    out = info.fan_out_dims[0] if info.fan_out_dims else None
    if head_dim is None and info.parts and info.part_heads and out is not None and info.part_groups:
        # an interleaved part's piece (its rows in the part's view): heads of the part's own width
        # (MLA's keys and values differ), found by the piece's rows
        rows = p.box[out]
        widths = {rows // h for (_, size), h in zip(info.parts, info.part_heads) if info.part_groups * size == rows}
        if len(widths) != 1:
            return None
        width = widths.pop()
        return rows // width if rows // width >= 2 else None
    if head_dim is None and info.parts and info.part_heads:
        head_dim = info.parts[0][1] // info.part_heads[0]
    if not head_dim or out is None:
        return None
    size = p.box[out]
    start = (int(p.index[0]) // math.prod(p.shape[out + 1:])) % p.shape[out]
    if size % head_dim or start % head_dim or size // head_dim < 2:
        return None
    return size // head_dim


# -- one block ---------------------------------------------------------------------------------


@dataclass
class BlockResult:
    """Everything measured of one block; `record` is its entry in hessian.json."""

    selector: str
    piece: Piece
    info: ParamInfo
    record: dict
    plan_partition: Partition | None = None    # over the piece's own flat indices
    row: HessianRow | None = None


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _mass_record(m) -> dict:
    return {"groups": m.groups, "inside": _finite(m.inside), "baseline": m.baseline,
            "ratio": _finite(m.ratio), "excess": _finite(m.excess)}


def analyze_block(H: torch.Tensor, p: Piece, info: ParamInfo) -> tuple[dict, Partition, HessianRow, torch.Tensor]:
    """Class, partition masses, found partition and spectrum of one block.

    Returns:
        (the JSON record of the numbers, the partition a plan should use over the piece's flat
        indices: the classification's partition for a block-diagonal block, one group for a dense
        one, the table row, and the eigenvalues, ascending).
    """
    perm, shape = rows_first(p, info)
    Hr = H if perm is None else H[perm][:, perm]
    heads = heads_of(p, info)
    c = classify(Hr, shape, heads)
    masses = {name: _mass_record(partition_mass(Hr, part)) for name, part in candidate_partitions(shape, heads).items()}
    masses["found"] = _mass_record(partition_mass(Hr, c.found))
    spectrum = block_spectrum(Hr, c.found if len(c.found) > 1 else None)
    eig = spectrum.eigenvalues
    top = float(Hr.abs().max())
    rows = shape[0]
    found_rows = c.found.labels().view(rows, -1)[:, 0]
    record = {
        "class": {"label": c.label, "hessian_class": c.hessian_class, "partition": c.partition.name,
                  "threshold": c.threshold, "why": c.why},
        "heads": heads,
        "rows_first_shape": list(shape),
        "out_axis": info.fan_out_dims[0] if info.fan_out_dims and len(p.box) > 1 else 0,
        "mass": masses,
        "found": {"groups": len(c.found), "sizes": c.found.sizes,
                  "rows": [torch.nonzero(found_rows == j).flatten().tolist() for j in range(len(c.found))]},
        "spectrum": {"lambda_max": spectrum.lambda_max, "lambda_min": spectrum.lambda_min,
                     "condition": _finite(spectrum.condition), "null_count": spectrum.null_count,
                     "negative": int((eig < -spectrum.tol * eig.abs().max()).sum()), "tol": spectrum.tol,
                     "trace": float(eig.sum()), "frobenius": float(eig.square().sum().sqrt())},
        "found_blocks": [{"size": g.size, "lambda_max": g.lambda_max, "lambda_min": g.lambda_min,
                          "condition": _finite(g.condition)} for g in spectrum.groups],
        "asymmetry": float((H - H.T).abs().max()) / top if top > 0 else 0.0,
    }
    use = c.partition if c.hessian_class == 1 else Partition("whole", [torch.arange(p.numel)])
    if perm is not None:      # back to the piece's own flat order
        use = Partition(use.name, [perm[g] for g in use.groups])
    record["plan_partition"] = {"name": use.name, "groups": len(use)}
    head = masses.get("per head")
    row = HessianRow(p.label, p.numel, c.label, (head["inside"], head["baseline"]) if head else None,
                     len(c.found), spectrum.lambda_max, spectrum.condition)
    return record, use, row, eig


# -- files -------------------------------------------------------------------------------------


def file_stem(selector: str, taken: set[str]) -> str:
    """A file name for a selector: ``h.0.c_attn.weight[part=q, head=1]`` → ``h.0.c_attn.weight_part=q_head=1``."""
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", selector.replace(":", "-")).strip("_.") or "block"
    unique, n = stem, 2
    while unique in taken:
        unique, n = f"{stem}-{n}", n + 1
    taken.add(unique)
    return unique


def _replace_with(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_array(H: np.ndarray, path: Path) -> None:
    _replace_with(path, lambda f: np.save(f, H))


def save_heatmap(H: np.ndarray, path: Path, title: str, heads: int | None) -> None:
    """|H| as a PNG, log colour scale, lines between heads; drawn on a private Agg canvas under
    matplotlib's default style, so neither the user's style nor pyplot's state is touched."""
    import matplotlib
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    a = np.abs(H)
    top = float(a.max()) if a.size else 0.0
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(6.4, 5.4), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        viridis = matplotlib.colormaps["viridis"]
        cmap = viridis.with_extremes(bad="white", under=viridis(0.0))
        if top > 0:
            positive = a[a > 0]
            norm = LogNorm(vmin=max(float(positive.min()), top * 1e-12), vmax=top)
            image = ax.imshow(np.ma.masked_equal(a, 0.0), cmap=cmap, norm=norm, interpolation="nearest")
            fig.colorbar(image, ax=ax, label="|H| (log scale; white: exactly 0)")
        else:
            ax.imshow(a, cmap=cmap, interpolation="nearest")
        if heads:
            for k in range(1, heads):
                edge = k * a.shape[0] / heads - 0.5
                ax.axhline(edge, color="red", lw=0.6, alpha=0.7)
                ax.axvline(edge, color="red", lw=0.6, alpha=0.7)
        ax.set_title(title, fontsize=8, wrap=True)
        ax.set_xlabel("entry (output unit major)")
        ax.set_ylabel("entry (output unit major)")
        _replace_with(path, lambda f: fig.savefig(f, format="png"))


# -- the run -----------------------------------------------------------------------------------


@dataclass
class _Run:
    """The document written to hessian.json (and printed with --format json)."""

    doc: dict
    out: Path
    results: list[BlockResult] = field(default_factory=list)

    def save(self) -> None:
        write_atomic(self.out / "hessian.json", json.dumps(self.doc, indent=2, allow_nan=False) + "\n")


def _run(args, err: Console) -> int:
    if args.target and args.example:
        raise UsageError("give either a model.py or --example, not both")
    if not args.target and not args.example:
        raise UsageError(f"nothing to analyze: give a model.py (e.g. {NAME} model.py) or a built-in example "
                         f"({NAME} --example binary)")
    device = parse_device(args.device)
    dtype = _DTYPES[args.dtype]
    note = (lambda msg: None) if args.quiet else (lambda msg: err.print(f"{NAME}: {msg}", markup=False))
    with user_code():
        task = load_example(args.example) if args.example else load_task(args.target)
        lr = args.lr or task.defaults.get("lr", DEFAULTS["lr"])
        model, optimizer = build(task, device, lr, args.seed, with_optimizer=args.at > 0)
        layers = resolve_layers(model, warn=False)
        # Selectors are checked before anything is trained or computed: a typo costs nothing.
        pieces, skipped = _select(args, model, layers, task.source)
        for msg in skipped:
            note(f"skipped {msg}")
        if args.at > 0:
            _train(task, model, optimizer, args.at, device)
        batches, batch_source = _batches(task, args, device)
        _check_losses(task, model, batches)

    out = Path(args.out)
    if args.plan_out:
        check_writable_file(args.plan_out, "--plan-out")
    with RunFolder(out, NAME) as folder:
        # The earlier Hessian run here (hessian.json and its blocks' files, nothing else: --out may be
        # an analysis run folder) is kept in OUT/previous once this run has a block, else put back.
        taken: set[str] = set()   # every block's files, named and checked before any is computed
        stems = {selector: file_stem(selector, taken) for selector in pieces}
        files = ["hessian.json", *(f"{stem}{ext}" for stem in stems.values()
                                   for ext in (".npy", ".eigvals.npy", ".png"))]
        folder.begin(_hessian_files(out), has_blocks, files, kind="hessian")
        folder.claim(["hessian.json"])
        try:
            return _compute(args, err, task, model, layers, pieces, stems, skipped, batches, batch_source, lr, device,
                            dtype, out, folder, note)
        finally:
            try:
                if folder.settle(has_blocks, "hessian") == "kept":
                    note(f"the earlier Hessian run in {out} is now in {out / PREVIOUS}")
            except FolderError as e:   # never in place of the run's own outcome
                note(f"warning: {e}")


def _hessian_files(out: Path) -> list[str]:
    """hessian.json and the files its blocks list: what a Hessian run left in `out`."""
    names = ["hessian.json"]
    try:
        doc = json.loads((out / "hessian.json").read_text())
        names += [Path(f).name for b in doc.get("blocks", []) for f in (b.get("files") or {}).values()]
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return list(dict.fromkeys(names))


def has_blocks(folder: Path, names=None) -> bool:
    """Whether `folder` holds a Hessian run with at least one computed block."""
    try:
        doc = json.loads((folder / "hessian.json").read_text())
        return any(b.get("status") == "done" for b in doc.get("blocks", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _compute(args, err, task, model, layers, pieces, stems, skipped, batches, batch_source, lr, device, dtype,
             out: Path, folder: RunFolder, note) -> int:
    """Compute the blocks into the locked `out`, saving hessian.json after each."""
    run = _Run({"schema": SCHEMA,
                "model": {**model_record(model), "source": task.source},
                "settings": {"at": "init" if args.at == 0 else args.at,
                             "optimizer": None if args.at == 0 else "build_optimizer(model)" if task.build_optimizer
                             else f"AdamW(lr={lr:g})",
                             "dtype": args.dtype, "batches": len(batches), "batch_source": batch_source,
                             "seed": args.seed, "device": str(device), "max_entries": args.max_entries,
                             "max_bytes": int(args.max_gib * 2**30) if args.max_gib else None},
                "status": "running", "blocks": [], "skipped": skipped, "plan": None}, out)
    run.save()
    quiet = args.quiet or not err.is_terminal
    progress = Progress(TextColumn("hessian"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[block]}"),
                        TimeElapsedColumn(), console=err, transient=True, disable=quiet)
    bar = progress.add_task("hessian", total=len(pieces), block="")
    try:
        with progress:
            for i, (selector, p) in enumerate(pieces.items()):
                progress.update(bar, completed=i, block=selector)
                result = _one_block(task, model, batches, selector, p, layers[p.name], dtype, args, out,
                                    stems[selector], note, folder.claim)
                run.results.append(result)
                run.doc["blocks"].append(result.record)
                run.save()
    except KeyboardInterrupt:
        run.doc["status"] = "interrupted"
        run.save()
        note(f"interrupted: {len(run.results)} of {len(pieces)} block(s) kept in {out}")
        raise
    done = [r for r in run.results if r.record["status"] == "done"]
    run.doc["status"] = "complete" if len(done) == len(run.results) else "partial"
    if args.plan_out and done:
        run.doc["plan"] = _write_plan(run.results, model, layers, Path(args.plan_out), note)
    run.save()
    if not done:
        reasons = "; ".join(f"{r.selector}: {r.record['reason']}" for r in run.results)
        if all(r.record["status"] == "too_large" for r in run.results):
            raise UsageError(f"every block is too large: {reasons}")
        raise TaskError(f"no block could be computed: {reasons}")
    _emit(args, run, task.source, batch_source)
    return 0


def _select(args, model, layers: ModelLayers, source: str) -> tuple[dict[str, Piece], list[str]]:
    """The pieces to compute, by selector, and notes on default blocks skipped as too large.

    Raises:
        UsageError: a selector that does not resolve, or no default block at all.
    """
    if args.block:
        selectors, skipped = list(dict.fromkeys(args.block)), []
    else:
        selectors, skipped = default_blocks(layers, args.max_entries)
        if not selectors:
            raise UsageError("no default block (attention Q/K/V/output or MLP weight) of at most "
                             f"{args.max_entries:,} entries in {source}; name blocks with --block SELECTOR or "
                             "raise --max-entries" + (f" ({'; '.join(skipped)})" if skipped else ""))
    pieces = {}
    for s in selectors:
        try:
            pieces[s] = piece(model, s, layers)
        except HessianError as e:
            raise UsageError(f"--block {e}") from None       # e starts with the selector
    return pieces, skipped


def _emit(args, run: _Run, source: str, batch_source: str) -> None:
    """stdout: one JSON document, or the table."""
    if args.format == "json":
        sys.stdout.write(json.dumps(run.doc, indent=2, allow_nan=False) + "\n")
    else:
        console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
        at = "initialisation" if args.at == 0 else f"step {args.at}"
        console.print(HessianTable([r.row for r in run.results],
                                   f"Exact Hessian blocks of {source} at {at} ({args.dtype}, mean loss over "
                                   f"{batch_source})"))
        console.print(f"arrays, heatmaps and hessian.json in {run.out}" +
                      (f"; plan in {args.plan_out}" if run.doc["plan"] else ""), markup=False, style="dim")


def _one_block(task: Task, model, batches, selector: str, p: Piece, info: ParamInfo, dtype: torch.dtype, args,
               out: Path, stem: str, note, claim) -> BlockResult:
    """Compute, measure and save one block; a block that cannot be computed is a record with its reason."""
    base = {"block": selector, "parameter": p.name, "role": info.role, "shape": list(p.box), "size": p.numel}

    own = next(model.parameters()).dtype
    where = " while computing the Hessian (it runs in eval() mode" + (
        f", on a {args.dtype} copy of the model: tensors loss_fn makes itself need the batch's dtype"
        + (", and some kernels have no float64 version, e.g. the grouped matrix products of transformers' MoE "
           "experts" if dtype == torch.float64 else "")
        + f"; or use --dtype {str(own).replace('torch.', '')})" if dtype != own else ")")

    def loss_fn(model, batch):     # the user's code raising here fails the same for every block: exit 3
        try:
            return task.loss_fn(model, batch)
        except Exception as e:
            raise TaskError(f"loss_fn(model, batch) in {task.source} raised {type(e).__name__}: {e}{where}") from e

    t0 = time.perf_counter()
    try:
        with user_code():
            H = block_hessian(model, loss_fn, batches, p, dtype=dtype,
                              max_bytes=int(args.max_gib * 2**30) if args.max_gib else None)
    except HessianTooLarge as e:
        note(f"{selector}: too large: {e}")
        return _failed(selector, p, info, base, "too_large", str(e), "too large")
    except (RandomForwardError, LossFnError) as e:
        raise TaskError(f"{task.source}: {e}") from None       # the same for every block
    except TaskError:
        raise
    except (HessianError, RuntimeError) as e:
        # e.g. an operator of the model without a double backward, or a parameter the loss does
        # not use: this block fails, the others may not
        first = str(e).splitlines()[0] if str(e) else ""
        reason = first if isinstance(e, HessianError) else f"{type(e).__name__}: {first}"
        note(f"{selector}: failed: {reason}")
        if args.debug:
            traceback.print_exc()
        return _failed(selector, p, info, base, "failed", reason, "failed")
    seconds = time.perf_counter() - t0
    record, use, row, eigenvalues = analyze_block(H, p, info)
    claim([f"{stem}.npy", f"{stem}.eigvals.npy", f"{stem}.png"])   # never over a file lowmem did not write
    H_np = H.detach().cpu().numpy()
    save_array(H_np, out / f"{stem}.npy")
    save_array(eigenvalues.detach().cpu().numpy(), out / f"{stem}.eigvals.npy")
    perm, _ = rows_first(p, info)
    shown = H_np if perm is None else H_np[perm.numpy()][:, perm.numpy()]
    save_heatmap(shown, out / f"{stem}.png", f"|H| of {selector}: {record['class']['label']}", record["heads"])
    record = {**base, "status": "done", "reason": None, "seconds": round(seconds, 3), **record,
              "files": {"npy": str(out / f"{stem}.npy"), "eigvals": str(out / f"{stem}.eigvals.npy"),
                        "png": str(out / f"{stem}.png")}}
    return BlockResult(selector, p, info, record, use, row)


def _failed(selector, p, info, base, status, reason, words) -> BlockResult:
    return BlockResult(selector, p, info, {**base, "status": status, "reason": reason},
                       row=HessianRow(selector, p.numel, failure=reason, status=words))


def _write_plan(results: list[BlockResult], model, layers: ModelLayers, path: Path, note) -> dict:
    """A plan from the measured partitions of the parameters the blocks cover whole (a fused
    weight's q, k and v parts together cover it); other parameters keep full Adam."""
    by_param: dict[str, list[BlockResult]] = {}
    for r in results:
        if r.record["status"] == "done":
            by_param.setdefault(r.piece.name, []).append(r)
    partitions, uncovered = {}, []
    for name, rs in by_param.items():
        numel = layers[name].numel
        whole = next((r for r in rs if r.piece.numel == numel), None)
        if whole is not None:
            partitions[name] = Partition(whole.plan_partition.name,
                                         [whole.piece.index[g] for g in whole.plan_partition.groups])
            continue
        covered = torch.cat([r.piece.index for r in rs])
        if covered.numel() == numel and covered.unique().numel() == numel:
            words = ", ".join(f"{r.selector.removeprefix(name).strip()} {r.plan_partition.name}" for r in rs)
            partitions[name] = Partition(words, [r.piece.index[g] for r in rs for g in r.plan_partition.groups])
        else:
            uncovered.append(name)
    for name in uncovered:
        note(f"plan: the blocks of {name} do not cover it whole; it keeps full Adam")
    plan = plan_from_partitions(model, partitions, layers=layers, source={"blocks": [r.selector for r in results]})
    plan.save(path)
    return {"path": str(path), "parameters": sorted(partitions), "uncovered": uncovered,
            "v_kept": plan.summary["v_kept"], "v_full": plan.summary["v_full"]}


# -- the task ----------------------------------------------------------------------------------




def _user(task: Task, what: str, fn, *args):
    try:
        return fn(*args)
    except (KeyboardInterrupt, TaskError):
        raise
    except Exception as e:
        raise TaskError(f"{what} in {task.source} raised {type(e).__name__}: {e}") from e


def _loss(task: Task, model, batch, where: str) -> torch.Tensor:
    loss = _user(task, "loss_fn(model, batch)", task.loss_fn, model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        found = (type(loss).__name__ if not isinstance(loss, torch.Tensor) else
                 f"a tensor of shape {tuple(loss.shape)}" if loss.numel() != 1 else
                 f"a tensor of dtype {str(loss.dtype).replace('torch.', '')}")
        raise TaskError(f"loss_fn(model, batch) in {task.source} must return a scalar torch.Tensor of a real "
                        f"floating-point dtype, it returned {found} {where}")
    return loss


def _train(task: Task, model, optimizer, steps: int, device: torch.device) -> None:
    """`steps` optimizer steps on get_batch(0 … steps-1), as the probe trains."""
    model.train()
    for step in range(steps):
        batch = to_device(_user(task, f"get_batch({step})", task.get_batch, step), device)
        loss = _loss(task, model, batch, f"at step {step}")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(step, value)
        if not loss.requires_grad:
            raise TaskError(f"loss_fn(model, batch) in {task.source} returned a loss with no gradient at step {step} "
                            "(computed under torch.no_grad(), detached, or not using the model's parameters): "
                            "--at N trains on it")
        _user(task, "loss.backward()", loss.backward)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _batches(task: Task, args, device: torch.device) -> tuple[list, str]:
    """The batches the loss is averaged over, and where they came from."""
    if args.batches is None and args.example:
        dataset = getattr(importlib.import_module(EXAMPLES[args.example]), "dataset", None)
        if callable(dataset):
            return [to_device(dataset(), device)], "the whole dataset()"
    n = args.batches or 1
    batches = [to_device(_user(task, f"get_batch({i})", task.get_batch, i), device) for i in range(n)]
    return batches, f"get_batch(0)" if n == 1 else f"get_batch(0 … {n - 1})"


def _check_losses(task: Task, model, batches) -> None:
    """Each batch's loss is a finite scalar, checked in eval() as the Hessian sees it (no
    batch-norm statistics move)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                value = float(_loss(task, model, batch, f"on batch {i}"))
                if not math.isfinite(value):
                    raise TaskError(f"the loss of {task.source} is {value} on batch {i}: the Hessian of a "
                                    "non-finite loss means nothing; check the data or the model")
    finally:
        model.train(was_training)


if __name__ == "__main__":
    sys.exit(main())
