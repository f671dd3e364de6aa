"""The ``native`` backend: the plan engine's CPU step as one C kernel call per bucket
(`kernels/step.c`), built with the machine's C compiler on first use.

Why a C kernel called through `ctypes`, and not a `torch.library` C++ op or `torch.compile`:
measured on the 2-core machine of BENCHMARKS.md, a C++ extension through
`torch.utils.cpp_extension` needs ninja and takes about a minute to build against torch's
headers, while this plain C file builds in about a second with no dependency but a C compiler;
`torch.compile` of the update (the ``compiled`` backend) compiles once per make-up of a bucket
and, on the built-in GPT, ran slower than the per-op path. A CPU step is memory-bound, so what
matters is one pass over each state with everything else in cache: the kernel reduces ``g²``
over each row (or column) block, updates `v`, then `m` and the parameter in the same pass, and
decodes / encodes stored formats (bf16, block-wise 8- and 4-bit codes) in registers, so a
quantized state never exists in fp32 outside a 256-entry tile. Threads: OpenMP, as many as
``torch.get_num_threads()``; the library links the OpenMP runtime that torch itself loaded.
The same library holds the SNR capture's two CPU measurements: the state formats' round trips
(`precision_sums`) and the slice sums of the SNR (`snr_sums`), each one call per measurement.

The build lands in ``$LOWMEM_CACHE_DIR`` (default ``~/.cache/lowmem``; a folder in the temporary
directory where that cannot be written) under a name that hashes the source, the compiler's
version and the instruction sets it targets here, written under a temporary name and renamed, so
concurrent processes share one build, with its SHA-256 beside it: a build that does not match
it (damaged after it was written) is built again rather than loaded. A compiler without OpenMP
builds a one-thread kernel. Without a compiler (or when the build fails) the engine runs the
foreach backend and warns once; ``LOWMEM_NATIVE=0`` turns the kernel off without a warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from lowmem.compress.formats import QUANTIZED, block_of, rows_of
from lowmem.compress.optim._common import local
from lowmem.compress.optim.backends import Bucket, StepScalars, _canonical
from lowmem.compress.optim.state import stored_shapes

SOURCE = Path(__file__).with_name("kernels") / "step.c"
FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC", "-std=c11")   # (no errno: sqrtf vectorises)
MODES = {"full": 0, "row": 1, "col": 2, "all": 3}
FORMATS = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}


class _Task(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("g", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("m_scale", ctypes.c_void_p), ("v", ctypes.c_void_p), ("v_scale", ctypes.c_void_p),
                ("comp", ctypes.c_void_p), ("n", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("qlen", ctypes.c_int64), ("mode", ctypes.c_int32), ("p_bf16", ctypes.c_int32),
                ("m_fmt", ctypes.c_int32), ("v_fmt", ctypes.c_int32)]


class _Scalars(ctypes.Structure):
    _fields_ = [(name, ctypes.c_float) for name in ("decay", "beta1", "beta2", "omb1", "omb2", "eps",
                                                      "step_size", "bc2")] + [("maximize", ctypes.c_int32)]


class _PrecTask(ctypes.Structure):
    _fields_ = [("m", ctypes.c_void_p), ("v", ctypes.c_void_p), ("out", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("qlen", ctypes.c_int64), ("bc1", ctypes.c_float), ("sbc2", ctypes.c_float), ("eps", ctypes.c_float),
                ("quantized", ctypes.c_int32)]


SNR_MAXDIM = 8   # dims of a view, at most (`snr_sums`)


class _SnrTask(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("ndim", ctypes.c_int64), ("shape", ctypes.c_int64 * SNR_MAXDIM),
                ("stride", ctypes.c_int64 * SNR_MAXDIM), ("nsub", ctypes.c_int64), ("subs", ctypes.c_void_p),
                ("out", ctypes.c_void_p)]


class _Codec(ctypes.Structure):
    _fields_ = [("qmap", ctypes.c_void_p), ("cells", ctypes.c_void_p), ("cuts", ctypes.c_void_p),
                ("block", ctypes.c_int32), ("shift", ctypes.c_int32)]


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("LOWMEM_CACHE_DIR") or Path.home() / ".cache" / "lowmem")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _compiler() -> list[str]:
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)   # (CC may carry flags, e.g. "gcc -m64")
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if found is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    return [found]


def _target(cc: list[str]) -> bytes:
    """What identifies the code a build makes here: the compiler's version, and the macros it
    defines for this CPU under ``-march=native`` (its instruction sets), with the machine's name
    and CPU flags (where the compiler does not know ``-march=native``)."""
    run = lambda args: subprocess.run([*cc, *args], capture_output=True, text=True, timeout=60, input="").stdout
    return "\0".join([run(["--version"]), run(["-march=native", "-dM", "-E", "-x", "c", "-"]), platform.machine(),
                      _cpu_flags()]).encode()


def _folders() -> list[Path]:
    """Where a build may go: the cache folder, then (when that cannot be written) a folder of the
    user's in the temporary directory."""
    user = getattr(os, "getuid", lambda: "user")()
    return [cache_dir(), Path(tempfile.gettempdir()) / f"lowmem-{user}"]


def _compile(cc: list[str], target: Path) -> None:
    """Build the kernel at `target`: under a temporary name in its folder, flushed to disk,
    readable by everyone (a shared cache), then renamed, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        errors = ""
        # -march=native where the compiler knows it; without OpenMP where it has none (one thread)
        for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
            proc = subprocess.run([*cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if proc.returncode == 0:
                break
            errors = proc.stderr.strip()
        else:
            raise RuntimeError(f"{' '.join(cc)} failed: {errors[-2000:]}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            digest = hashlib.sha256(f.read()).hexdigest()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)
        os.replace(tmp, target)
        _write_atomically(_digest_path(target), digest, 0o644 & ~umask)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _write_atomically(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _intact(target: Path) -> bool:
    """Whether a build in the cache is whole: its bytes hash to the digest written beside it
    (loading a damaged shared library can kill the process, so it is checked first)."""
    try:
        return hashlib.sha256(target.read_bytes()).hexdigest() == _digest_path(target).read_text().strip()
    except OSError:
        return False


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.lowmem_step.restype = ctypes.c_int
    lib.lowmem_step.argtypes = [ctypes.c_int64, ctypes.POINTER(_Task), ctypes.POINTER(_Scalars),
                                ctypes.POINTER(_Codec), ctypes.POINTER(_Codec), ctypes.POINTER(_Codec), ctypes.c_int]
    lib.lowmem_precision.restype = ctypes.c_int
    lib.lowmem_precision.argtypes = [ctypes.c_int64, ctypes.POINTER(_PrecTask), ctypes.POINTER(_Codec),
                                     ctypes.POINTER(_Codec), ctypes.POINTER(_Codec), ctypes.c_int]
    lib.lowmem_snr.restype = ctypes.c_int
    lib.lowmem_snr.argtypes = [ctypes.c_int64, ctypes.POINTER(_SnrTask), ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    return lib


def _build() -> ctypes.CDLL:
    """Build (or find built) and load the kernel; raises OSError / RuntimeError on failure."""
    cc = _compiler()
    tag = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), _target(cc), " ".join(FLAGS).encode()])).hexdigest()[:16]
    failures = []
    for folder in _folders():
        target = folder / f"lowmem_step_{tag}.so"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if target.exists() and _intact(target):
                try:
                    return _load(target)
                except OSError as e:   # (another machine's build in a shared folder): build it again
                    failures.append(f"{target}: {e}")
            _compile(cc, target)   # a damaged or missing build is replaced
            return _load(target)
        except OSError as e:
            failures.append(f"{folder}: {e}")
    raise OSError("; ".join(failures))


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on the first call; None (after one warning) where it cannot be
    built, or when ``LOWMEM_NATIVE=0``."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if not _tried:
            if os.environ.get("LOWMEM_NATIVE", "1") != "0":
                try:
                    _library = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    warnings.warn(f"lowmem: the native CPU step kernel could not be built ({e}); the optimizer "
                                  "steps with the foreach backend instead (slower, same results up to rounding). "
                                  "Set LOWMEM_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=3)
            _tried = True
    return _library


def available() -> bool:
    return library() is not None


# -- codecs ---------------------------------------------------------------------------------------
_codecs: dict = {}


def _codec(which: str, fmt: str) -> _Codec:
    """The lookup tables of `which`'s map in `fmt` (kept alive with the struct that points at them)."""
    key = (which, fmt)
    if key not in _codecs:
        from lowmem.compress.optim.quant import _encoder, _switch_points
        from lowmem.compress.optim.state import _qmap

        qmap = _qmap(which, fmt, torch.device("cpu")).contiguous()
        enc = _encoder(qmap, torch.device("cpu"))
        if enc.steps != 1:   # the kernel looks up one switch point per cell
            raise AssertionError(f"the {which} map in {fmt} has cells with {enc.steps} switch points")
        cells = _cells(enc)
        block = block_of(fmt)
        if block & (block - 1):   # the kernel finds a block by a shift
            raise AssertionError(f"block size {block} of {fmt} is not a power of two")
        # a 16-value map's switch points in one register (the kernel's search), +inf after them
        cuts = (torch.cat((_switch_points(qmap.float()), torch.tensor([torch.inf]))).contiguous()
                if qmap.numel() == 16 else None)
        c = _Codec(qmap.data_ptr(), cells.data_ptr(), None if cuts is None else cuts.data_ptr(), block,
                   block.bit_length() - 1)
        c.keep = (qmap, cells, cuts)
        _codecs[key] = c
    return _codecs[key]


_EMPTY = _Codec(None, None, None, 0, 0)


def _cells(enc) -> torch.Tensor:
    """The kernel's table of an encoder (`quant._Encoder`, one switch point per cell at most):
    per cell of 17 leading bits, its lowest code << 16 | T, where T is the switch point's low
    15 bits (reversed, 0x7FFF minus them, in negative cells, where a larger magnitude is a
    smaller value) or 0x8000 where the cell holds none."""
    cut = enc.cuts[0].cpu()
    cell = torch.arange(cut.numel(), dtype=torch.int64)
    low = cut.view(torch.int32).to(torch.int64) & 0x7FFF
    t = torch.where(cell >= cut.numel() // 2, 0x7FFF - low, low)      # the upper half: sign bit set
    t = torch.where(torch.isfinite(cut), t, 0x8000)
    return ((enc.base.cpu().to(torch.int64) << 16) | t).to(torch.int32).contiguous()


# -- the backend ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _plan(layout, shape: tuple[int, ...], m_fmt: str, v_fmt: str) -> tuple:
    """What the kernel needs of a parameter that does not change between steps (computed once
    per layout, shape and formats): (mode, cols, qlen, the numel and dtype each of m's and v's
    tensors must have: {state key: (numel, dtype)})."""
    canon, _, dim = _canonical(layout.blocks[0])
    if dim is None:
        mode, cols = MODES["full"], 0
    elif len(canon) == 1:
        mode, cols = MODES["all"], 0
    else:
        mode, cols = (MODES["row"] if dim == 1 else MODES["col"]), canon[1]
    kept = shape if mode == MODES["full"] else tuple(layout.v_shape)
    want = {}
    for key, fmt, size in (("exp_avg", m_fmt, shape), ("exp_avg_sq", v_fmt, kept)):
        for suffix, (t_shape, dtype) in stored_shapes(fmt, size).items():
            want[key + suffix] = (math.prod(t_shape), dtype or torch.float32)
    return mode, cols, rows_of(shape)[1], want


def fits(t: torch.Tensor | None, numel: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `t` is a contiguous tensor of `numel` entries of `dtype` on `device`."""
    return (t is not None and t.dtype == dtype and t.is_contiguous() and t.numel() == numel
            and t.device == device)


def kernel_plan(p, g, state: dict, layout, m_fmt: str, v_fmt: str, device: torch.device) -> tuple | None:
    """`_plan` of a parameter whose tensors a step kernel (this one, or the Triton kernels on
    `device`) can read as they are, or None where one is not (a dtype, shape or layout that a
    checkpoint or a caller brought): that parameter steps on the torch backends instead."""
    plan = _plan(layout, tuple(p.shape), m_fmt, v_fmt)
    n, dtype = p.numel(), p.dtype
    if not (dtype in (torch.float32, torch.bfloat16) and fits(p, n, dtype, device) and fits(g, n, dtype, device)):
        return None
    for key, (numel, want_dtype) in plan[3].items():
        if not fits(state.get(key), numel, want_dtype, device):
            return None
    return plan


def serves_stored(st, kind: str, roundings: tuple[str, ...]) -> bool:
    """Whether the step kernels read a staged bucket's parameters (`BucketKey.stored`) straight
    from their stored formats: fp32 compute, contiguous fp32 or bf16 parameters (low-precision
    ones rounded as one of `roundings` says), the formats the kernels know, a quantized `v`
    only where it is kept per entry (full Adam)."""
    return (st.compute_dtype == torch.float32 and st.contiguous and st.param_dtype in (torch.float32, torch.bfloat16)
            and (st.rounding in roundings or st.param_dtype == torch.float32)
            and st.m in FORMATS and st.v in FORMATS and (st.v not in QUANTIZED or kind == "full"))


_CPU = torch.device("cpu")


def _task(p, g, state: dict, layout, m_fmt: str, v_fmt: str, comp) -> _Task | None:
    """The kernel's description of one parameter, or None where `kernel_plan` says it cannot
    read it."""
    plan = kernel_plan(p, g, state, layout, m_fmt, v_fmt, _CPU)
    if plan is None or not (comp is None or fits(comp, p.numel(), torch.bfloat16, _CPU)):
        return None
    mode, cols, qlen, _ = plan
    ms, vs = state.get("exp_avg_scale"), state.get("exp_avg_sq_scale")
    return _Task(p.data_ptr(), g.data_ptr(), state["exp_avg"].data_ptr(), ms.data_ptr() if ms is not None else None,
                 state["exp_avg_sq"].data_ptr(), vs.data_ptr() if vs is not None else None,
                 comp.data_ptr() if comp is not None else None, p.numel(), cols, qlen,
                 mode, int(p.dtype == torch.bfloat16), FORMATS[m_fmt], FORMATS[v_fmt])


def native_step(b: Bucket, s: StepScalars) -> None:
    """The bucket's update in one kernel call: its fp32 parameters, and its staged parameters
    (`BucketKey.stored`) straight from their stored formats. A parameter whose tensors the
    kernel cannot read as they are steps on the foreach backend (through fp32 temporaries when
    staged), in the same call."""
    from lowmem.compress.optim.backends import torch_ops_step

    tasks, touched = [], []
    rest = Bucket(b.key, b.state_dtype, b.scratch)
    for p, g, m, v, lay, step in zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.layouts, b.steps):
        task = _task(p, g, {"exp_avg": m, "exp_avg_sq": v}, lay, "fp32", "fp32", None)
        if task is None:
            for lst, x in ((rest.params, p), (rest.grads, g), (rest.exp_avgs, m), (rest.exp_avg_sqs, v),
                           (rest.layouts, lay), (rest.steps, step)):
                lst.append(x)
            continue
        tasks.append(task)
        touched += [p, m, v]
    m8 = m4 = v8 = _EMPTY
    for st in b.stages:
        state = {k: local(t) for k, t in st.state.items()}
        comp = state.get("kahan_comp") if st.rounding == "kahan" and st.shard.dtype != torch.float32 else None
        task = _task(st.shard, st.grad, state, st.layout, st.fmt.m, st.fmt.v, comp)
        if task is None:
            rest.stages.append(st)
            continue
        tasks.append(task)
        touched += [st.shard] + [t for k, t in state.items() if k != "step" and isinstance(t, torch.Tensor)]
        m8 = _codec("m", "int8") if st.fmt.m == "int8" else m8
        m4 = _codec("m", "int4") if st.fmt.m == "int4" else m4
        v8 = _codec("v", "int8") if st.fmt.v == "int8" else v8
    if tasks:
        scalars = _Scalars(s.decay, s.beta1, s.beta2, 1 - s.beta1, 1 - s.beta2, s.eps, s.step_size, s.bc2_sqrt,
                           int(s.maximize))
        array = (_Task * len(tasks))(*tasks)
        if library().lowmem_step(len(tasks), array, ctypes.byref(scalars), ctypes.byref(m8), ctypes.byref(m4),
                                 ctypes.byref(v8), torch.get_num_threads()) != 0:
            raise MemoryError("lowmem: the native step kernel could not allocate its work list")
        torch.autograd.graph.increment_version(touched)   # written in place, as torch's kernels count it
    torch_ops_step(rest, s)


def serves(key) -> bool:
    """Whether the native backend takes a bucket: CPU, one canonical block (or full Adam), fp32
    compute. Parameters in fp32 with fp32 states: contiguous ones, not full Adam (torch's fused
    AdamW kernel steps those, AdamW exactly). Others (`BucketKey.stored`): contiguous, fp32 or
    bf16, rounded to nearest or with a Kahan buffer (stochastic rounding stays on the staged
    path)."""
    if key.device.type != "cpu" or key.kind not in ("full", "canonical"):
        return False
    st = key.stored
    if st is None:
        ok = key.native and key.kind != "full" and key.dtype == torch.float32
    else:
        ok = serves_stored(st, key.kind, ("nearest", "kahan"))
    return ok and available()


# -- the precision measurement ---------------------------------------------------------------------
def precision_sums(entries: list[tuple]) -> None:
    """`lowmem.snr.precision.error_sums` of many parameters in one kernel call (`lowmem_precision`
    in `kernels/step.c`: each state read once, every format's round trip made a tile at a time).

    Each entry is ``(m, v, out, bc1, sqrt_bc2, eps, quantized)``: `m` and `v` contiguous fp32 CPU
    tensors of equal size, their quantization rows dim 0 (`rows_of`); `out` a float64 CPU tensor
    of ``13`` sums (``7`` where not `quantized`: bf16 formats only), written in place; the
    caller checks `available` first."""
    tasks = []
    for m, v, out, bc1, sqrt_bc2, eps, quantized in entries:
        if not (fits(m, m.numel(), torch.float32, _CPU) and fits(v, m.numel(), torch.float32, _CPU)
                and fits(out, 13 if quantized else 7, torch.float64, _CPU)):
            raise ValueError("precision_sums takes contiguous fp32 CPU states of equal size and a float64 output")
        out.zero_()
        if m.numel() == 0:   # nothing to measure: zero sums
            continue
        qlen = rows_of(tuple(m.shape))[1] if quantized else 0
        tasks.append(_PrecTask(m.data_ptr(), v.data_ptr(), out.data_ptr(), m.numel(), qlen, bc1, sqrt_bc2, eps,
                               int(quantized)))
    if not tasks:
        return
    array = (_PrecTask * len(tasks))(*tasks)
    if library().lowmem_precision(len(tasks), array, ctypes.byref(_codec("m", "int8")),
                                  ctypes.byref(_codec("m", "int4")), ctypes.byref(_codec("v", "int8")),
                                  torch.get_num_threads()) != 0:
        raise MemoryError("lowmem: the native precision kernel could not allocate its work list")


# -- the SNR measurement ---------------------------------------------------------------------------
def snr_reads(x: torch.Tensor) -> bool:
    """Whether `snr_sums` takes `x`: an fp32 CPU tensor (any strides) of at most `SNR_MAXDIM` dims."""
    return x.device == _CPU and x.dtype == torch.float32 and 1 <= x.dim() <= SNR_MAXDIM


def snr_sums(entries: list[tuple[torch.Tensor, list[tuple[int, ...]]]], report: dict | None = None
             ) -> list[torch.Tensor]:
    """`lowmem.snr.estimator.snr_sums` of each view along each of its subsets, in one kernel call
    (`lowmem_snr` in `kernels/step.c`: each view read once for all its subsets, the slices' sums
    in double, on ``torch.get_num_threads()`` threads; the numbers do not depend on them).

    Each entry is ``(x, subsets)``, `x` a view that `snr_reads` takes (no copy is made); returns
    for each entry a float64 ``(len(subsets), 4)`` tensor, row i ``[Σ mean²/var, Σ mean², Σ var,
    count]`` over the slices along ``subsets[i]`` whose ratio is finite. The caller checks
    `available` first. Its memory (`report`, a dict, gets it as ``"scratch_bytes"``: the most
    held at once): per view being read (one per thread at most), 16 bytes per slice of each
    subset (per work item for a subset across dim 0, those together at most a quarter of the
    view's own bytes or 1 MiB) and 4 per slice, e.g. 0.021 of a 4096 x 1024 matrix's `v` for its
    three subsets."""
    tasks, outs, keep = [], [], []
    for x, subsets in entries:
        if not snr_reads(x):
            raise ValueError("snr_sums takes fp32 CPU tensors of 1 to 8 dims")
        if any(not s or len(set(s)) != len(s) or not all(0 <= a < x.dim() for a in s) for s in subsets):
            raise ValueError(f"subsets {subsets} are not subsets of the axes of a {x.dim()}-dim view")
        out = torch.zeros(len(subsets), 4, dtype=torch.float64)
        outs.append(out)
        if not subsets or x.numel() == 0:   # no slice: zero sums
            continue
        masks = (ctypes.c_int32 * len(subsets))(*(sum(1 << a for a in s) for s in subsets))
        pad = (0,) * (SNR_MAXDIM - x.dim())
        tasks.append(_SnrTask(x.data_ptr(), x.dim(), (ctypes.c_int64 * SNR_MAXDIM)(*x.shape, *pad),
                              (ctypes.c_int64 * SNR_MAXDIM)(*x.stride(), *pad), len(subsets),
                              ctypes.cast(masks, ctypes.c_void_p), out.data_ptr()))
        keep.append((x, masks))
    peak = ctypes.c_int64(0)
    if tasks:
        array = (_SnrTask * len(tasks))(*tasks)
        if library().lowmem_snr(len(tasks), array, torch.get_num_threads(), ctypes.byref(peak)) != 0:
            raise MemoryError("lowmem: the native SNR kernel could not allocate its sums")
    if report is not None:
        report["scratch_bytes"] = peak.value
    return outs


__all__ = ["available", "cache_dir", "library", "native_step", "precision_sums", "serves", "snr_reads",
           "snr_sums"]
