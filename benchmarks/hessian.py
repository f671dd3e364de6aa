"""Exact Hessian blocks of the built-in transformer: lowmem against torch's ways and the HVP floor.

    python benchmarks/hessian.py [--sizes 1024,3072] [--methods all|lowmem,loop,...]
        [--device cpu|cuda] [--threads N] [--repeats 3] [--hvps 15] [--timeout 900]
        [--mem-limit-gb X] [--force] [--json]

Model and data: `lowmem.examples.binary` (the Adam-mini paper's Hessian setup: 4 layers, width
32, 4 heads), ``build_model()`` after ``torch.manual_seed(0)``, the whole dataset (``dataset()``:
16 sequences x 41 tokens) as the one batch, mean cross-entropy. Blocks of
``transformer.h.1.attn.c_attn.weight`` (96 x 32, Q/K/V stacked along the rows), flattened
row-major: d = 1,024 is ``[part=q]`` (all of Q), d = 3,072 the whole weight, any other multiple of
32 the first d/32 rows (``--sizes 256`` is ``[part=q, 0:8]``, for a quick check). float64.

Methods (rows):
- ``lowmem``: ``lowmem.block_hessian(model, loss_fn, [batch], selector, dtype=torch.float64)`` on
  the float32 model, defaults (chunks of 64 rows; batched or looped double backward, whichever
  is faster on the first chunk). Its time includes its own float64 copy of the model and its
  determinism check (two no-grad forwards): small, counted against lowmem.
- ``torch.func``: ``torch.func.hessian(f)(x)`` (jacfwd over jacrev, no chunking).
- ``autograd.functional``: ``torch.autograd.functional.hessian(f, x, vectorize=True)``.
- ``loop``: a plain Python loop of double-backward Hessian-vector products: one
  ``autograd.grad(f(x), x, create_graph=True)``, then d ``autograd.grad(g, x, e_i,
  retain_graph=True)`` with one-hot e_i, rows written into a preallocated (d, d) tensor.
- ``floor``: d Hessian-vector products at the measured cost of one: the median of `--hvps` single
  double backwards through one kept graph (of random unit vectors), times d. The graph's build
  (one forward and one backward with create_graph) is reported separately, not added.
For the torch rows, f(x) is the loss as a function of the block's flat entries x: the weight with
x put in its rows (``torch.cat`` of the rows before, x, the rows after), run through
``torch.func.functional_call`` on a float64 copy of the model; the other parameters fixed.

Fairness:
- every row runs in ``eval()`` with scaled-dot-product attention forced to the math kernel
  (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``): PyTorch's fused CPU SDPA kernel has no
  double backward, so Hessian-vector products through it fail (lowmem forces the math kernel
  itself, the torch rows get it from this script);
- every row runs in its own fresh subprocess (``--_one METHOD SIZE``), with the same torch thread
  count (printed), after the same untimed warm-up (one forward and backward of f); only the
  method's call is timed (wall clock; on CUDA synchronised);
- every child also times the floor right after its method (the median of `--hvps` single HVPs,
  times d), so "x floor" is a ratio to a floor measured in the same process within seconds: on a
  shared, busy machine this pairs out load that changes between children. The floor row's own
  time is reported in its row; "x floor" of a row repeated `--repeats` times (lowmem, loop,
  floor: cheap) is the median of its paired ratios, its time the median time. torch.func and
  autograd.functional run once per size (each takes minutes; ``--repeats-slow``);
- the children run with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296``
  (printed; not where the environment sets MALLOC_* itself, or with ``--glibc-defaults``): with
  glibc's defaults a fresh process returns the temporaries of every HVP to the OS and
  page-faults them in again, until some large block freed raises glibc's dynamic mmap threshold.
  Measured here: one HVP 26 ms in a fresh process, 18 ms after a `block_hessian` call in the same
  process, 17 ms from the start with these settings. Without them the floor row (a fresh process
  doing only HVPs) and the floors paired after a method run in different allocator states;
- torch's thread count is set explicitly in every child and printed. On a shared machine whose
  other processes keep the cores busy, OpenMP's spin-waiting makes torch with as many threads as
  cores dramatically slower on this model's small ops (measured on a 2-core machine while another
  2-thread torch process ran: one HVP 1.4 s with 2 threads, 22 ms with 1 thread or with
  ``OMP_WAIT_POLICY=PASSIVE``); the script warns when the load average says so. Use
  ``--threads 1`` (or that variable) there, and compare only runs with the same setting;
- the rows repeated run in rounds, the order rotated every round; the load average (1 min) at
  each child's start is recorded and printed;
- every result is checked against lowmem's: max |H - H_lowmem| (and relative to max |H|).

Peak memory: torch's CPU allocator keeps no peak counter, so on CPU it is the peak resident set
size of the child above its baseline: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read after the
method minus the same read just before it (after the model, the batch and the warm-up). It counts
everything the process touched (tensors, autograd graphs, BLAS workspaces), and misses memory
that the warm-up had already made resident and freed (glibc keeps some) -- a few MB. On CUDA it is
``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the method (tensors only).
The (d, d) float64 result itself is d^2 x 8 bytes (8 MiB at d = 1,024, 72 MiB at 3,072).

Skipped rows: torch.func and autograd.functional vmap over all d rows at once with no chunking,
so their memory grows with d (the issue measured 5.9 GB and 22 GB at d = 1,024 on this kind of
machine). A row whose estimated peak at d is above the limit (``--mem-limit-gb``, default 80% of
the memory available at start) is not run unless ``--force``; it prints "skipped (estimated N GB
> limit)". The estimate scales the same method's measured peak at the largest smaller size of this
run by (d / d_measured)^2 (conservative: the d vmap lanes grow linearly, the result as d^2; with two
smaller sizes measured, the exponent is fitted to them, within [1, 2]), or, above d = 1,024 when
this run has no smaller size, scales the issue's figures at 1,024 the same way (at d <= 1,024
with nothing measured the row runs). Each child has a time
limit (``--timeout`` s); a child past it is killed and its row says "timeout"; a child killed by a
signal (e.g. the OOM killer) says so.

Goal (issue): lowmem within 1.5x of the floor on CPU, its peak memory bounded by the chunk (not
d^2 x batch), far ahead of torch.func and autograd.functional. The PASS/FAIL line is informative:
the script always exits 0, it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from _machine import allocator_env, cpu_model, load_average, sync   # beside this script

PARAM = "transformer.h.1.attn.c_attn.weight"
METHODS = ("floor", "lowmem", "loop", "torch.func", "autograd.functional")
SLOW = ("torch.func", "autograd.functional")
LABELS = {
    "floor": "floor: d HVPs at the cost of one",
    "lowmem": "lowmem.block_hessian",
    "loop": "Python loop of HVPs",
    "torch.func": "torch.func.hessian",
    "autograd.functional": "autograd.functional.hessian(vec)",
}
# The issue's measurements at d = 1,024 (float64, 2 cores), used to estimate when this run has none.
ISSUE_PEAK_1024 = {"torch.func": 5.9e9, "autograd.functional": 22e9}
CHILD_ALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
ALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
             "MALLOC_MMAP_MAX_", "MALLOC_CONF", "GLIBC_TUNABLES", "LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF",
             "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


# -- machine ------------------------------------------------------------------------------------
def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- the block ------------------------------------------------------------------------------------
def selector_for(d: int) -> str:
    if d == 3072:
        return PARAM
    if d == 1024:
        return f"{PARAM}[part=q]"
    return f"{PARAM}[part=q, 0:{d // 32}]" if d < 1024 else f"{PARAM}[0:{d // 32}]"


def _size_ok(d: int) -> bool:
    return 0 < d <= 3072 and d % 32 == 0


# -- the child: one method at one size ----------------------------------------------------------------
def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def child(method: str, d: int, args) -> int:
    out: dict = {"method": method, "d": d, "load_1min_at_start": (load_average() or [None])[0]}
    try:
        _child(method, d, args, out)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        out["traceback"] = traceback.format_exc()[-2000:]
    print("@@RESULT " + json.dumps(out))
    return 0


def _child(method: str, d: int, args, out: dict) -> None:
    import lowmem
    from lowmem.examples import binary as ex
    from lowmem.hessian import piece
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ex.build_model().to(device)
    x_b, y_b = ex.dataset()
    batch = (x_b.to(device), y_b.to(device))
    selector = selector_for(d)

    # The same block by hand for the torch rows: rows r0:r1 of the weight, flat entries contiguous.
    w = dict(model.named_parameters())[PARAM]
    cols = w.shape[1]
    r0, r1 = 0, d // cols
    idx = piece(model, selector).index
    assert torch.equal(idx, torch.arange(r0 * cols, r1 * cols)), "block is not the rows assumed"
    model64 = ex.build_model().to(device)
    model64.load_state_dict(model.state_dict())
    model64 = model64.to(torch.float64).eval()
    params64 = {n: p.detach() for n, p in model64.named_parameters()}
    w64 = params64[PARAM]
    x0 = w64[r0:r1].reshape(-1).clone()

    def f(x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([w64[:r0].reshape(-1), x, w64[r1:].reshape(-1)]).view(w64.shape)
        return _loss(model64, params64, weight, batch)

    kernel = sdpa_kernel(SDPBackend.MATH)
    kernel.__enter__()

    # Warm-up (untimed): one forward and backward of f, the same for every method.
    xw = x0.clone().requires_grad_(True)
    torch.autograd.grad(f(xw), xw)
    del xw
    sync(device)

    # Baseline.
    rss0 = _maxrss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda0 = torch.cuda.memory_allocated(device)
    extra: dict = {}
    t0 = time.perf_counter()
    if method == "lowmem":
        H = lowmem.block_hessian(model, ex.loss_fn, [batch], selector, dtype=torch.float64)
    elif method == "torch.func":
        H = torch.func.hessian(f)(x0)
    elif method == "autograd.functional":
        H = torch.autograd.functional.hessian(f, x0, vectorize=True)
    elif method == "loop":
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        H = torch.empty(d, d, dtype=torch.float64, device=device)
        e = torch.zeros(d, dtype=torch.float64, device=device)
        for i in range(d):
            e.zero_()
            e[i] = 1.0
            (H[i],) = torch.autograd.grad(g, x, grad_outputs=e, retain_graph=True)
        del g, x
    elif method == "floor":
        t_hvp, t_graph = _hvp_cost(f, x0, args.hvps, device)
        H = None
        extra = {"hvp_s": t_hvp, "graph_s": t_graph}
    else:
        raise ValueError(f"unknown method {method!r}")
    sync(device)
    elapsed = time.perf_counter() - t0
    if method == "floor":
        elapsed = d * extra["hvp_s"]
    out["time_s"] = elapsed
    out["peak_rss_increase_bytes"] = max(0, _maxrss() - rss0)
    out["baseline_rss_bytes"] = rss0
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device) - cuda0
    out.update(extra)

    if H is not None:
        H = H.detach().reshape(d, d).to("cpu", torch.float64)
        out["symmetry"] = float((H - H.T).abs().max())
        out["max_abs"] = float(H.abs().max())
        path = Path(args._dir) / f"{method}-{d}.pt"
        torch.save(H, path)
        out["result_path"] = str(path)
        del H
    # The paired floor: single HVPs right after, in the same process.
    t_hvp, t_graph = (extra["hvp_s"], extra["graph_s"]) if method == "floor" else _hvp_cost(f, x0, args.hvps, device)
    out["paired_hvp_s"] = t_hvp
    out["paired_floor_s"] = d * t_hvp
    out["paired_graph_s"] = t_graph
    kernel.__exit__(None, None, None)


def _loss(model64, params64, weight, batch) -> torch.Tensor:
    """`lowmem.examples.binary.loss_fn` with the weight substituted (mean next-bit cross-entropy)."""
    logits = torch.func.functional_call(model64, {**params64, PARAM: weight}, (batch[0],), strict=True)
    y = batch[1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def _hvp_cost(f, x0: torch.Tensor, k: int, device: torch.device) -> tuple[float, float]:
    """(median seconds of one double backward through a kept graph, seconds to build the graph)."""
    x = x0.clone().requires_grad_(True)
    sync(device)
    t0 = time.perf_counter()
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    sync(device)
    t_graph = time.perf_counter() - t0
    gen = torch.Generator(device="cpu").manual_seed(0)
    vs = torch.randn(k + 1, x.numel(), generator=gen, dtype=x.dtype)
    vs = (vs / vs.norm(dim=1, keepdim=True)).to(device)
    torch.autograd.grad(g, x, grad_outputs=vs[0], retain_graph=True)   # untimed first call
    ts = []
    for v in vs[1:]:
        sync(device)
        t0 = time.perf_counter()
        torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True)
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), t_graph


# -- the parent -------------------------------------------------------------------------------------
def run_child(method: str, d: int, args, tmp: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_one", method, str(d), "--device", args.device,
           "--hvps", str(args.hvps), "--_dir", tmp]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    load = (load_average() or [None])[0]
    env = {**os.environ, **args.child_env}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "d": d, "status": "timeout", "load_1min_at_start": load,
                "note": f"timeout (> {args.timeout:.0f} s, killed)"}
    wall = time.perf_counter() - t0
    res = None
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            res = json.loads(line[len("@@RESULT "):])
    if res is None:
        why = (f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
               if proc.returncode < 0 else f"exit status {proc.returncode}")
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"method": method, "d": d, "status": "failed", "load_1min_at_start": load,
                "note": f"{why}: {tail[0][:200]}"}
    res["status"] = "error" if "error" in res else "ok"
    if "error" in res:
        res["note"] = res["error"]
        if args.verbose:
            print(res.get("traceback", ""), file=sys.stderr)
    res["child_wall_s"] = round(wall, 2)
    return res


def _estimate(method: str, d: int, done: dict) -> tuple[float, str] | None:
    """Estimated peak bytes of `method` at `d` (see the module doc), or None: no estimate, run it."""
    measured = sorted((dd, r["peak"]) for (m, dd), r in done.items() if m == method and dd < d and r.get("peak"))
    if len(measured) >= 2:
        (d1, m1), (d2, m2) = measured[-2:]
        p = min(2.0, max(1.0, math.log(m2 / m1) / math.log(d2 / d1))) if m1 > 0 and m2 > 0 else 2.0
        return m2 * (d / d2) ** p, f"its {d2:,} block's peak x ({d}/{d2})^{p:.2f}, exponent fitted to {d1:,} and {d2:,}"
    if measured:
        dd, peak = measured[-1]
        return peak * (d / dd) ** 2, f"its {dd:,} block's peak x ({d}/{dd})^2"
    if d > 1024:
        return (ISSUE_PEAK_1024[method] * (d / 1024) ** 2,
                f"the issue's {ISSUE_PEAK_1024[method] / 1e9:.1f} GB at 1,024 x ({d}/1024)^2")
    return None


def bench_size(d: int, methods: list[str], args, tmp: str, done: dict, limit: float) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    skipped: dict[str, str] = {}
    for m in methods:
        if m in SLOW and not args.force and (e := _estimate(m, d, done)) is not None:
            est, how = e
            if est > limit:
                skipped[m] = (f"skipped (estimated {est / 1e9:.1f} GB > limit {limit / 1e9:.1f} GB; from {how}; "
                              "--force runs it)")
    live = [m for m in methods if m not in skipped]
    rounds = max(args.repeats, args.repeats_slow if any(m in SLOW for m in live) else 0)
    for r in range(rounds):
        k = r % max(1, len(live))
        for m in live[k:] + live[:k]:
            want = args.repeats_slow if m in SLOW else args.repeats
            if len(runs[m]) >= want:
                continue
            if runs[m] and runs[m][-1]["status"] != "ok":
                continue   # a failed or timed-out row is not repeated
            if not args.json:
                print(f"  .. {LABELS[m]} at d = {d:,} (round {r + 1}, load {(load_average() or ['?'])[0]})",
                      file=sys.stderr, flush=True)
            runs[m].append(run_child(m, d, args, tmp))

    ref = None
    for run in runs.get("lowmem", []):
        if run["status"] == "ok":
            ref = torch.load(run["result_path"])
            break
    rows = []
    for m in methods:
        row: dict = {"method": m, "label": LABELS[m]}
        if m in skipped:
            row.update(status="skipped", note=skipped[m])
            rows.append(row)
            continue
        ok = [x for x in runs[m] if x["status"] == "ok"]
        row["runs"] = [{k: v for k, v in x.items() if k not in ("traceback", "result_path")} for x in runs[m]]
        row["load_1min_at_start"] = [x.get("load_1min_at_start") for x in runs[m]]
        if not ok:
            row.update(status=runs[m][-1]["status"], note=runs[m][-1].get("note", ""))
            rows.append(row)
            continue
        row["status"] = "ok"
        times = [x["time_s"] for x in ok]
        row["time_s"] = statistics.median(times)
        row["times_s"] = [round(t, 3) for t in times]
        ratios = [x["time_s"] / x["paired_floor_s"] for x in ok]
        row["x_floor"] = statistics.median(ratios)
        row["x_floor_runs"] = [round(q, 3) for q in ratios]
        row["paired_floor_s"] = statistics.median(x["paired_floor_s"] for x in ok)
        key = "peak_cuda_bytes" if args.device.startswith("cuda") else "peak_rss_increase_bytes"
        row["peak_bytes"] = max(x[key] for x in ok)   # the worst of the runs
        row["peak_rss_increase_bytes"] = max(x["peak_rss_increase_bytes"] for x in ok)
        if m == "floor":
            row["hvp_ms"] = statistics.median(x["hvp_s"] for x in ok) * 1e3
            row["graph_ms"] = statistics.median(x["graph_s"] for x in ok) * 1e3
        if m != "floor":
            H = torch.load(ok[0]["result_path"])
            row["symmetry"] = ok[0]["symmetry"]
            if ref is not None:
                diff = float((H - ref).abs().max())
                row["max_abs_diff_vs_lowmem"] = diff
                row["rel_diff_vs_lowmem"] = diff / max(float(ref.abs().max()), 1e-300)
            del H
        if len(runs[m]) > len(ok):
            row["note"] = f"{len(runs[m]) - len(ok)} of {len(runs[m])} runs failed: " + runs[m][-1].get("note", "")
        done[(m, d)] = {"peak": row["peak_bytes"]}
        rows.append(row)
    for run_list in runs.values():
        for x in run_list:
            p = x.get("result_path")
            if p and os.path.exists(p):
                os.remove(p)
    return {"d": d, "selector": selector_for(d), "result_bytes": d * d * 8, "rows": rows,
            "max_abs_lowmem": float(ref.abs().max()) if ref is not None else None}


def _gb(b) -> str:
    if b is None:
        return "--"
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB" if b >= 1e7 else f"{b / 1e6:.1f} MB"


def print_size(res: dict, args) -> None:
    d = res["d"]
    print()
    print(f"== {d:,} x {d:,}: {res['selector']} (result {_gb(res['result_bytes'])}) ==")
    head = (f"{'method':<34} {'time s':>8} {'x floor':>8} {'(runs)':>15} {'peak mem':>10} "
            f"{'max|H-lowmem|':>14} {'load':>5}")
    print(head)
    print("-" * len(head))
    rows = {r["method"]: r for r in res["rows"]}
    for r in res["rows"]:
        load = ",".join(f"{x:.1f}" for x in r.get("load_1min_at_start", []) if x is not None)
        if r["status"] != "ok":
            print(f"{r['label']:<34} {r['note']}" + (f"  [load {load}]" if load else ""))
            continue
        runs = r["x_floor_runs"]
        rr = f"{min(runs):.2f}..{max(runs):.2f}" if len(runs) > 1 else ""
        diff = ("(ref)" if r["method"] == "lowmem" else
                f"{r['max_abs_diff_vs_lowmem']:.1e}" if "max_abs_diff_vs_lowmem" in r else "--")
        if r["method"] == "floor":
            diff = ""
        print(f"{r['label']:<34} {r['time_s']:>8.2f} {r['x_floor']:>8.2f} {rr:>15} {_gb(r['peak_bytes']):>10} "
              f"{diff:>14} {load:>5}")
        if r.get("note"):
            print(f"  note: {r['note']}")
    fl = rows.get("floor")
    if fl and fl["status"] == "ok":
        print(f"floor: one HVP {fl['hvp_ms']:.2f} ms (median of {args.hvps}) x {d:,} = {fl['time_s']:.2f} s; "
              f"building the graph once (forward + backward with create_graph) {fl['graph_ms']:.1f} ms, not added")
    if res["max_abs_lowmem"] is not None:
        sym = rows["lowmem"].get("symmetry") if "lowmem" in rows else None
        print(f"max |H_lowmem| = {res['max_abs_lowmem']:.3e}; lowmem max |H - H^T| = {sym:.1e}")
    lm = rows.get("lowmem")
    if lm and lm["status"] == "ok":
        ahead = []
        for m in SLOW:
            o = rows.get(m)
            if o and o["status"] == "ok":
                ahead.append(f"{LABELS[m].split('(')[0]} {o['time_s'] / lm['time_s']:.1f}x its time, "
                             f"{o['peak_bytes'] / max(lm['peak_bytes'], 1):.0f}x its memory")
        verdict = "PASS" if lm["x_floor"] <= 1.5 else "FAIL"
        print(f"goal: lowmem within 1.5x of the floor -> {verdict} (x{lm['x_floor']:.2f}); "
              f"peak {_gb(lm['peak_bytes'])} = result {_gb(res['result_bytes'])} + "
              f"{_gb(max(0, lm['peak_bytes'] - res['result_bytes']))} working"
              + ("; others vs lowmem: " + "; ".join(ahead) if ahead else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,3072", help="block sizes d, comma-separated (default 1024,3072)")
    ap.add_argument("--methods", default="all", help=f"comma-separated of {', '.join(METHODS)} (default all)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3, help="children per size for lowmem, loop, floor (default 3)")
    ap.add_argument("--repeats-slow", type=int, default=1,
                    help="children per size for torch.func and autograd.functional (default 1)")
    ap.add_argument("--hvps", type=int, default=15, help="single HVPs timed for a floor (median; default 15)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child before it is killed (default 900)")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="skip torch.func / autograd.functional rows estimated above this (default: 80%% of "
                         "MemAvailable at start on CPU, of the GPU's memory on CUDA)")
    ap.add_argument("--force", action="store_true", help="run rows even when estimated above the memory limit")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help=f"run the children with glibc's default allocator settings instead of "
                         f"{' '.join(f'{k}={v}' for k, v in CHILD_ALLOC_ENV.items())} (see the module doc)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of children that fail")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    ap.add_argument("--_one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--_dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._one:
        return child(args._one[0], int(args._one[1]), args)

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: cannot read {args.sizes!r}")
    for d in sizes:
        if not _size_ok(d):
            ap.error(f"--sizes: {d} is not a multiple of 32 in 32..3072 (whole rows of the 96 x 32 weight)")
    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {', '.join(bad)} (choose from {', '.join(METHODS)})")
    methods = [m for m in METHODS if m in methods]   # the table's order
    if args.repeats < 1 or args.repeats_slow < 1 or args.hvps < 1:
        ap.error("--repeats, --repeats-slow and --hvps must be >= 1")

    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    args.threads = threads
    if args.mem_limit_gb is not None:
        limit = args.mem_limit_gb * 1e9
    elif device.type == "cuda":
        limit = 0.8 * torch.cuda.get_device_properties(device).total_memory
    else:
        limit = 0.8 * (_meminfo("MemAvailable") or 8e9)
    env = allocator_env(ALLOC_ENV)
    own = any(k.startswith("MALLOC_") for k in env)
    args.child_env = {} if (args.glibc_defaults or own or device.type != "cpu") else dict(CHILD_ALLOC_ENV)
    machine = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "threads": threads, "python": platform.python_version(),
               "libc": " ".join(platform.libc_ver()), "mem_total_bytes": _meminfo("MemTotal"),
               "mem_available_bytes_at_start": _meminfo("MemAvailable"), "allocator_env": env,
               "load_avg_at_start": load_average(), "child_allocator_env": {**env, **args.child_env}}
    if not args.json:
        gpu = f" ({machine['gpu']})" if machine["gpu"] else ""
        mt, ma = machine["mem_total_bytes"], machine["mem_available_bytes_at_start"]
        print(f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {_gb(mt)} RAM ({_gb(ma)} available) | "
              f"device {machine['device']}{gpu} | torch {machine['torch']} | torch threads {threads} | "
              f"python {machine['python']} | {machine['libc']}")
        cenv = machine["child_allocator_env"]
        print(f"load average (1/5/15 min) at start: {machine['load_avg_at_start']} | children's allocator env: "
              + (" ".join(f"{k}={v}" for k, v in cenv.items()) or "none set (glibc defaults)"))
        print("model: lowmem.examples.binary.build_model() (torch.manual_seed(0); 4 layers, width 32, 4 heads), "
              "batch = dataset() (16 x 41 tokens), mean cross-entropy; float64; eval(); SDPA forced to the math "
              "kernel (the fused CPU kernel has no double backward)")
        print(f"each row in a fresh subprocess; time: the method's call after a warm-up forward+backward; x floor: "
              f"median of ratios to d x (median of {args.hvps} single HVPs) timed in the same child right after; "
              f"lowmem/loop/floor {args.repeats} children (rounds, order rotated), torch.func/autograd.functional "
              f"{args.repeats_slow}; peak mem: " +
              ("torch.cuda.max_memory_allocated above the start" if device.type == "cuda" else
               "peak RSS (ru_maxrss) increase of the child over its baseline") +
              f"; rows estimated > {_gb(limit)} skipped unless --force; child timeout {args.timeout:.0f} s")

        la = (machine["load_avg_at_start"] or [0])[0]
        if (device.type == "cpu" and threads > 1 and la + threads > (os.cpu_count() or 1) + 0.5
                and "OMP_WAIT_POLICY" not in env):
            print(f"WARNING: load average {la} + {threads} torch threads > {os.cpu_count()} cores: OpenMP spin-waiting "
                  "can make every row many times slower (see the module doc); consider --threads 1 or "
                  "OMP_WAIT_POLICY=PASSIVE")

    t_start = time.perf_counter()
    results, done = [], {}
    with tempfile.TemporaryDirectory(prefix="lowmem-hessian-bench-") as tmp:
        for d in sorted(sizes):
            res = bench_size(d, methods, args, tmp, done, limit)
            results.append(res)
            if not args.json:
                print_size(res, args)
                sys.stdout.flush()
    wall = time.perf_counter() - t_start
    machine["load_avg_at_end"] = load_average()
    if not args.json:
        lm = [(r["d"], x) for r in results for x in r["rows"] if x["method"] == "lowmem" and x["status"] == "ok"]
        if lm:
            print("\nlowmem peak memory by block size (chunk 64 rows): " + "; ".join(
                f"d = {d:,}: {_gb(x['peak_bytes'])} (result {_gb(d * d * 8)})" for d, x in lm))
    if args.json:
        print(json.dumps({"command": " ".join(["python", *sys.argv]), "machine": machine,
                          "settings": {"sizes": sizes, "methods": methods, "repeats": args.repeats,
                                       "repeats_slow": args.repeats_slow, "hvps": args.hvps,
                                       "timeout_s": args.timeout, "mem_limit_bytes": limit, "force": args.force},
                          "sizes": results, "wall_s": round(wall, 1)}, indent=2, default=str))
    else:
        print(f"\nwall time {wall:.0f} s; load average (1/5/15 min) at end {machine['load_avg_at_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
