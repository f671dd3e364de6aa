"""Capture the SNR of Adam's `v` from a live optimizer through a step post-hook.

Usage in your own training loop::

    with lowmem.capture(optimizer, model, every=10, out="snr.csv") as cap:
        for step in range(steps):
            loss = loss_fn(model, get_batch(step)); loss.backward()
            optimizer.step(); optimizer.zero_grad()
    cap.samples  # every sample, also streamed to snr.csv

The hook reads ``optimizer.state[p]["exp_avg_sq"]`` (torch Adam/AdamW with the plain, foreach or
fused kernels, on any device) every `every` optimizer steps, counted by ``state["step"]`` so a
step skipped by AMP does not count. The statistics of one measurement are computed on the
state's device and moved to the host in one transfer per device. Between measurements the hook
does no host synchronisation: a device-resident ``step`` is read only when a measurement may
be due.

FSDP2: with parameters sharded by `torch.distributed.fsdp.fully_shard` (DTensors sharded along
dim 0), every rank must attach a capture, since a measurement is collective: each rank reduces
its shard's entries and two all-reduces of partial sums per measurement give every rank the
SNR of the whole `v` (equal to a single-process measurement up to float round-off); per-row and
per-head statistics that a shard holds whole stay on their rank. Only global rank 0 writes `out`.

Shadow-v mode (``shadow=True``) keeps ``v ← β2 v + (1−β2) g²`` from the gradients itself, for
optimizers that keep no ``exp_avg_sq`` (SGD, Adafactor, lowmem's own optimizers); it costs one
full-size tensor per parameter and counts steps by hook calls.

Precision (``precision=True``, or a ``precision_out`` file): at the same measurements (or, with
``precision_every``, at the first and at those whose step is a multiple of it), the error
each storage format of `m` and `v` would cause, from ``exp_avg``, ``exp_avg_sq``, ``step`` and the
group's betas and eps (`lowmem.snr.precision`); sharded parameters from per-rank partial sums, in
one all-reduce per process group. Shadow mode, and parameters without ``exp_avg``, measure none.
On CPU all parameters go through one call of a native kernel that reads each state once and makes
the five round trips 256 entries at a time (`lowmem.snr.precision.error_sums_all`); on CUDA (where
Triton is installed) all go through two Triton kernel launches, with no host sync; elsewhere (bf16
CPU state, no C compiler, no Triton) torch ops, same-shaped small states stacked.

Cost: on CPU every fp32 view goes through one call of a native kernel
(`lowmem.compress.optim.native.snr_sums`, `lowmem_snr` in ``kernels/step.c``): each view is read
once for all its subsets, each entry adding its deviation from a fixed entry of its slice, and
that deviation's square, to the slice's sums in double, on all threads with one parallel region
per measurement; the numbers equal numpy float64's to about 1e-12 on real models' views (the
kernel's comment bounds it), whatever the number of threads. On CUDA, where Triton is installed,
every fp32, bf16 or fp16 view goes through a handful of Triton launches per measurement
(`lowmem.compress.optim.gpu.snr_sums`: the same sums in fp64 for each view and subset, no host
sync; the torch ops were about 15,000 launches on gpt2-124m). Elsewhere (bf16 or float64 CPU
state, no C compiler, no Triton, or a kernel that did not compile: one warning) torch ops in the
state's dtype: `v` read once per axis subset that no
smaller one of the same view divides (the others combined from slice statistics,
`lowmem.snr.estimator.snr_sums_many`), views of one shape stacked and measured together
(`snr_sums_stacked`); the same numbers up to float32 rounding, except that a slice whose
variance is below float32's range (a `v` of about 1e-21) is lost there as constant. Measured on
gpt2-124m, 2 CPU threads, a batch of 64 tokens (`BENCHMARKS.md`): the SNR 0.075-0.087 of a
training step (the torch ops took 0.13-0.37), the precision 0.33-0.35, nothing between
measurements; so every=10 costs under 1% with the SNR alone and about 4% with both, about 2.5%
with the precision at every second measurement (``precision_every=2 * every``). On the built-in
example a measurement with both takes about 8 ms (every=10: about 1%).

CUDA side stream (``stream=True``): the hook launches the measurement on a side stream that first
waits for the step that wrote the state (on the device), and returns; its numbers come back by one
non-blocking copy into pinned host memory, and are taken in (``samples``, the files, `on_sample`)
at a later step's hook once they have arrived, or at `flush`/`close`. The next ``optimizer.step()``
makes its stream wait for the measurement before it writes the state (a step pre-hook, on the
device). So forward and backward run beside the measurement, and the host never waits for it,
except where the optimizer keeps ``step`` on the device (fused/capturable AdamW), whose value is
read once per measurement, as without a side stream. The trade-off is memory: the measurement's
temporaries (below) are alive during the next forward and backward, on top of their activations,
and the caching allocator keeps the blocks they used reserved for the side stream afterwards
(until ``torch.cuda.empty_cache()``).
The first measurement also copies the quantization maps to the device once. A process killed
outright loses the measurement still in flight; closing the capture (as a ``with`` block and
`lowmem-analyze` do on Ctrl-C or an exception) takes it in.

Memory: on CPU the SNR kernel holds, per view being read (one per thread), two doubles and a
float per slice of each subset (per work item for a subset across dim 0, those at most a quarter
of the view's bytes or 1 MiB): about 2% of a matrix's `v`, half of a 12-head view's, and no
copy of the state; elsewhere the SNR's temporaries are chunks of about 2^20 entries
(`lowmem.snr.estimator.CHUNK`, one dim-0 row at least) with the slice statistics of one view at
a time. The precision takes, on CPU, a few kilobytes per thread, elsewhere chunks of 2^18
entries (`lowmem.snr.precision.CHUNK`). On gpt2-124m the peak extra memory was 3 MiB and under
1 MiB against 949 MiB of state.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Callable

import torch
from torch import nn

from lowmem.layers import ModelLayers, ParamInfo, is_sharded, normalize_name, resolve_layers
from lowmem.sharding import RowShards, ShardedRegion, all_reduce_by_group, local_region, row_shards, sharded_region
from lowmem.snr.estimator import CHUNK, axis_subsets, slice_sums, snr_sums, snr_sums_stacked, snr_terms_many, work_size
from lowmem.snr.precision import PrecisionSample, PrecisionWriter, error_sums_all, errors_from_sums
from lowmem.snr.trajectory import Sample, TrajectoryWriter
from lowmem.snr.views import View, param_views, unsplit_subset


class NoAdamStateError(RuntimeError):
    """The optimizer keeps no ``exp_avg_sq`` for any parameter (and shadow mode is off)."""


class SnrCapture:
    """A step post-hook on `optimizer` that measures the SNR of `v` every `every` steps.

    Args:
        optimizer: a torch optimizer over (some of) `model`'s parameters; its other parameters are
            not measured (a warning counts them).
        model: the model, used for names, roles and heads (`lowmem.layers.resolve_layers`).
        every: measure when ``state["step"] % every == 0``.
        out: trajectory CSV path, streamed (see `lowmem.snr.trajectory`); None keeps samples in memory
            only. With sharded parameters only global rank 0 writes it.
        shadow: keep a shadow `v` from the gradients instead of reading ``exp_avg_sq``.
        beta2: decay of the shadow `v`; default the optimizer's ``betas[1]`` or 0.999.
        layers: pre-resolved layers (default: resolved from `model`).
        on_sample: called with each measurement's samples (e.g. to update a progress display).
        precision: also measure the error each storage format of `m` and `v` causes (see the
            module docstring); default: when `precision_out` is given.
        precision_out: precision CSV path, streamed like `out` (`lowmem.snr.precision`); None keeps
            the precision samples in memory only (``precision_samples``).
        stream: on CUDA, run each measurement on a side stream (see the module docstring): the
            hook returns at once and training goes on beside it; its samples arrive (``samples``,
            the files, `on_sample`) at a later step or at `close`. Needs every tracked parameter
            on one CUDA device, unsharded.
        precision_every: measure the precision only at the first measurement and at those whose
            step is a multiple of this (a multiple of `every`, e.g. ``2 * every``): on a large CPU
            model the precision costs 4-6 times the SNR, so this brings a measurement's average
            cost down, at the price of fewer precision samples for the plan (the plan's `window`
            must hold at least one). The first is kept because it is often the worst: on the
            built-in example the largest error of a (layer, state, format) falls there in 55 of
            148 cases (`benchmarks/precision_cadence.py`). Default: at every measurement.

    Raises:
        ValueError: `every` is not a positive integer, `precision_every` not a positive multiple of
            it or given to a capture that measures no precision, no parameter of `optimizer`
            belongs to `model` (another model's optimizer would measure nothing), or
            ``stream=True`` where the parameters are not all on one CUDA device or are sharded.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, every: int = 10,
                 out: str | os.PathLike | None = None, shadow: bool = False,
                 beta2: float | None = None, layers: ModelLayers | None = None,
                 on_sample: Callable[[list[Sample]], None] | None = None, precision: bool | None = None,
                 precision_out: str | os.PathLike | None = None, stream: bool = False,
                 precision_every: int | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        measures_precision = (precision_out is not None if precision is None else bool(precision)) and not shadow
        if precision_every is not None:
            if not (isinstance(precision_every, numbers.Integral) and not isinstance(precision_every, bool)
                    and precision_every >= every and precision_every % every == 0):
                raise ValueError(f"precision_every must be a positive multiple of every ({every}): the precision is "
                                 f"measured at some of the SNR's measurements; got {precision_every!r}")
            if not measures_precision:
                raise ValueError("precision_every says when the precision is measured; this capture measures none "
                                 "(shadow mode reads no m; otherwise give precision=True or precision_out)")
            precision_every = int(precision_every)
        _check_belongs(optimizer, model)
        self.optimizer = optimizer
        self.every = every
        self.shadow = shadow
        self.layers = layers if layers is not None else resolve_layers(model)
        self.on_sample = on_sample
        self.samples: list[Sample] = []
        self.precision = measures_precision
        self.precision_samples: list[PrecisionSample] = []
        self.precision_every = precision_every
        self._precision_taken = False   # whether a measurement has measured the precision yet
        self.measured_steps: list[int] = []
        self._handle = None
        self._calls = 0
        self._known_step = None     # last step read from the optimizer's state; None: read it next call
        self._calls_at_known = 0    # hook calls when it was read
        self._last_measured = None
        if beta2 is None:
            betas = optimizer.param_groups[0].get("betas") if optimizer.param_groups else None
            beta2 = float(betas[1]) if betas else 0.999
        self.beta2 = beta2
        self._shadow_v: dict[nn.Parameter, torch.Tensor] = {}

        by_name = {normalize_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}
        names = {id(by_name[info.name]): info for info in self.layers if info.name in by_name}
        self._tracked: list[tuple[nn.Parameter, ParamInfo, list[View], list[list[tuple[int, ...]]]]] = []
        self._group: dict[nn.Parameter, dict] = {}   # each tracked parameter's group: betas and eps
        # Sharded parameters (FSDP2): their rows per rank, and each (view, subset)'s share of this rank.
        self._shards: dict[nn.Parameter, tuple[RowShards, dict[tuple[str, tuple[int, ...]], ShardedRegion]]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                info = names.get(id(p))
                if info is None:
                    continue
                views = param_views(info)
                if is_sharded(p):   # interleaved parts are strided across a rank's rows: not measured there
                    views = [v for v in views if v.source is None]
                subsets = [axis_subsets(len(v.shape)) for v in views]
                self._tracked.append((p, info, views, subsets))
                self._group[p] = group
                if is_sharded(p):
                    shards = row_shards(p, info.name)
                    self._shards[p] = (shards, {(view.name, s): sharded_region(
                        shards, tuple(info.shape), view.shape, s, view.dim, view.start or 0, view.stop or 0)
                        for view, subs in zip(views, subsets) for s in subs})
        # The scratch buffer of a measurement: what `snr_sums` needs for the largest view, at most
        # about `CHUNK` entries or one dim-0 row (sharded: a rank's rows are measured whole).
        self._largest = max((p.to_local().numel() if is_sharded(p) else max(work_size(v.shape) for v in views)
                             for p, _, views, _ in self._tracked if views), default=0)
        self._stream = _side_stream([p for p, *_ in self._tracked], bool(self._shards)) if stream else None
        self._pending: list[_Pending] = []      # launched on the side stream, not yet on the host
        self._unwaited: list = []               # their events, not yet waited for by a step
        self._pre_handle = None
        writes = not self._shards or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        self._writer = TrajectoryWriter(out) if out is not None and writes else None
        self._precision_writer = PrecisionWriter(precision_out) \
            if self.precision and precision_out is not None and writes else None

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self) -> "SnrCapture":
        if self._handle is None:
            self._handle = self.optimizer.register_step_post_hook(self._hook)
            if self._stream is not None:
                self._pre_handle = self.optimizer.register_step_pre_hook(self._before_step)
            self._known_step = None   # steps taken while detached are not in the hook count
        return self

    def detach(self) -> None:
        """Remove the hook; a measurement still running on the side stream is taken in first
        (the hooks are removed even when that fails)."""
        try:
            self.flush()
        finally:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            if self._pre_handle is not None:
                self._pre_handle.remove()
                self._pre_handle = None

    def flush(self, wait: bool = True) -> None:
        """Take in the measurements launched on the side stream: all of them (waiting for the
        device), or with ``wait=False`` those whose numbers are already on the host."""
        while self._pending and (wait or self._pending[0].done.query()):
            pending = self._pending.pop(0)   # (taken off first: one that fails is not retried forever)
            self._finish(pending)
        if wait:
            self._unwaited.clear()

    def close(self):
        """Detach and move the trajectory file (and the precision file) into place (safe to call
        twice); returns the trajectory's path. The files are moved into place even when taking
        in a side-stream measurement fails (then that error is raised after)."""
        try:
            self.detach()
        finally:
            if self._precision_writer is not None:
                self._precision_writer.close()
            path = self._writer.close() if self._writer is not None else None
        return path

    def __enter__(self) -> "SnrCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def path(self):
        return self._writer.path if self._writer else None

    @property
    def precision_path(self):
        return self._precision_writer.path if self._precision_writer else None

    # -- the hook --------------------------------------------------------------------------
    def _before_step(self, optimizer, args, kwargs) -> None:
        """The step writes the state a side-stream measurement may still be reading: the step's
        stream waits for it on the device (no host synchronisation)."""
        for done in self._unwaited:
            torch.cuda.current_stream(self._stream.device).wait_event(done)
        self._unwaited.clear()

    def _hook(self, optimizer, args, kwargs) -> None:
        self._calls += 1
        if self._pending:
            self.flush(wait=False)
        if self.shadow:
            self._update_shadow()
            step = self._calls
        else:
            step = self._current_step()
            if step is None:
                return
        if step % self.every == 0 and step != self._last_measured:
            if self._stream is None:
                self.measure(step)
            else:
                self._pending.append(self._launch(step, self._stream))

    def _state_step(self) -> tuple[int, bool] | None:
        """(step, on_device) of the first tracked parameter with Adam state, or None before any."""
        for p, *_ in self._tracked:
            st = self.optimizer.state.get(p)
            if st and "step" in st and "exp_avg_sq" in st:
                s = st["step"]
                if isinstance(s, torch.Tensor):
                    return s, s.device.type != "cpu"
                return s, False
        return None

    def _current_step(self) -> int | None:
        found = self._state_step()
        if found is None:
            had_grads = any(p.grad is not None for p, *_ in self._tracked)
            if had_grads and not any("exp_avg_sq" in (self.optimizer.state.get(p) or {}) for p, *_ in self._tracked):
                raise NoAdamStateError(
                    f"{type(self.optimizer).__name__} keeps no 'exp_avg_sq' for any parameter after a step; "
                    "capture reads Adam's second moment. Use torch.optim.Adam/AdamW, or shadow=True "
                    "(CLI: --shadow-v) to estimate v from the gradients.")
            return None
        s, on_device = found
        if not on_device:
            return int(s)
        # Avoid a host sync every step: predict the step from hook calls and read the device
        # tensor only when a measurement may be due. A skipped AMP step makes the prediction run
        # ahead, never behind; reading the true value then puts it right. The first call after
        # attaching reads it, since the optimizer may have stepped before.
        if self._known_step is not None:
            predicted = self._known_step + (self._calls - self._calls_at_known)
            if predicted % self.every:
                return None
        self._known_step, self._calls_at_known = int(s), self._calls
        return self._known_step

    def _update_shadow(self) -> None:
        b2 = self.beta2
        for p, *_ in self._tracked:
            if p.grad is None:
                continue
            g = p.grad.detach()
            if g.is_sparse:
                raise ValueError("shadow v does not support sparse gradients")
            v = self._shadow_v.get(p)
            if v is None:
                v = self._shadow_v[p] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            v.mul_(b2).addcmul_(g.float(), g.float(), value=1 - b2)

    # -- measuring -------------------------------------------------------------------------
    def _v_of(self, p: nn.Parameter) -> torch.Tensor | None:
        if self.shadow:
            return self._shadow_v.get(p)
        st = self.optimizer.state.get(p)
        return st.get("exp_avg_sq") if st else None

    def measure(self, step: int) -> list[Sample]:
        """Measure every tracked parameter now; one host transfer per device (collective when
        parameters are sharded: every rank must measure at the same step), and the precision
        where it is measured at `step` (``precision_every``). Returns the samples (with
        ``stream=True`` too: an explicit call first takes in the measurements still in flight,
        then waits for its own results)."""
        self.flush()
        return self._finish(self._launch(step, None))

    def _launch(self, step: int, stream) -> "_Pending":
        """The device work of a measurement, on `stream` (a CUDA side stream, or None: the current
        one), ending in one copy of its numbers to the host per device: non-blocking into pinned
        memory on a side stream, an event marking when they have arrived."""
        self._last_measured = step   # (a hook at this same step count measures no second time)
        with_precision = self.precision and (self.precision_every is None or not self._precision_taken
                                             or step % self.precision_every == 0)
        self._precision_taken |= with_precision
        if stream is None:
            snr = self._snr_terms()
            precision = self._precision_sums() if with_precision else None
            return _Pending(step, snr, precision, None)
        main = torch.cuda.current_stream(stream.device)
        stream.wait_stream(main)   # the step that wrote the state comes first
        with torch.cuda.stream(stream):
            snr = self._snr_terms(stream)
            precision = self._precision_sums(stream) if with_precision else None
            done = torch.cuda.Event()
            done.record(stream)
        self._unwaited.append(done)
        return _Pending(step, snr, precision, done)

    def _finish(self, pending: "_Pending") -> list[Sample]:
        """The samples of a launched measurement (waiting for its numbers if they are not on the
        host yet), kept, written and reported."""
        if pending.done is not None:
            pending.done.synchronize()
        step = pending.step
        self.measured_steps.append(step)
        rows, host = pending.snr
        samples = []
        for i, info, view, s in rows:
            snr, mean_sq, var = host[i].tolist()
            samples.append(Sample(step, info.name, tuple(info.shape), view.label(), tuple(s), snr, mean_sq, var))
        self.samples.extend(samples)
        if self._writer is not None:
            self._writer.write(samples)
        if pending.precision is not None:
            precision = _precision_samples(step, *pending.precision)
            self.precision_samples.extend(precision)
            if self._precision_writer is not None:
                self._precision_writer.write(precision)
        if self.on_sample is not None:
            self.on_sample(samples)
        return samples

    def _snr_terms(self, stream=None) -> tuple[list, dict[int, torch.Tensor]]:
        """(rows, host numbers): each sample's (index, info, view, subset), and each index's
        [SNR, mean_sq, var] on the host (see `_to_host`)."""
        terms: list[torch.Tensor | None] = []
        rows: list[tuple[int, ParamInfo, View, tuple[int, ...]]] = []
        sharded = _ShardedMeasurement()
        jobs: list[tuple[torch.Tensor, list[tuple[int, tuple[int, ...]]]]] = []   # (view, [(index, subset)])
        # Scratch buffers per device and dtype (`_scratch`) for the deviations and the stacks,
        # instead of a full-size temporary per subset: on CPU those allocations slowed the next
        # training steps.
        work: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            for p, info, views, subsets in self._tracked:
                v = self._v_of(p)
                if v is None or tuple(v.shape) != tuple(info.shape):
                    continue
                v = v.detach()
                shards, regions = self._shards.get(p, (None, None))
                if shards is not None:
                    if not is_sharded(v):   # not a state sharded like the parameter: nothing to measure
                        continue
                    v = v.to_local()
                if stream is not None and v.is_cuda:
                    v.record_stream(stream)   # read on the side stream: not reused before it is done
                if shards is not None:   # (a rank's rows are measured whole)
                    dtype = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
                    buf = _scratch(work, v.device, dtype, max(self._largest, v.numel()))
                done: dict[tuple[str, tuple[int, ...]], int] = {}
                for view, subs in zip(views, subsets):
                    x = view.apply(v) if shards is None else \
                        local_region(v, shards.rows, view.dim, view.start or 0, view.stop or 0)
                    new = []
                    for s in subs:
                        # A head-view subset equal to an unsplit one reuses its numbers.
                        same = unsplit_subset(view, s)
                        index = done.get(same) if same else None
                        if index is None:
                            index = done[(view.name, s)] = len(terms)
                            terms.append(None)
                            new.append((index, s))
                            if shards is not None:
                                sharded.add(index, regions[(view.name, s)], x, shards.group, buf)
                        rows.append((index, info, view, s))
                    if shards is None and new:
                        jobs.append((x, new))
            _unsharded_terms(jobs, terms, work, self._largest)
            sharded.finish(terms)
            return rows, _to_host(terms, stream)

    def measure_precision(self, step: int) -> list[PrecisionSample]:
        """The error each storage format of `m` and `v` causes for every tracked parameter with
        Adam state (`lowmem.snr.precision`), kept in ``precision_samples``; one host transfer
        (collective when parameters are sharded: every rank must measure at the same step)."""
        samples = _precision_samples(step, *self._precision_sums())
        self.precision_samples.extend(samples)
        return samples

    def _precision_sums(self, stream=None) -> tuple[list[ParamInfo], dict[int, torch.Tensor]]:
        """(the parameters measured, each one's `error_sums` on the host by position)."""
        found: list[tuple[ParamInfo, tuple]] = []
        groups: list[object] = []   # each one's process group (sharded), or None
        with torch.no_grad():
            for p, info, *_ in self._tracked:
                st = self.optimizer.state.get(p) or {}
                m, v = st.get("exp_avg"), st.get("exp_avg_sq")
                if m is None or v is None or "step" not in st or tuple(v.shape) != tuple(info.shape) \
                        or tuple(m.shape) != tuple(info.shape):
                    continue
                shards = self._shards.get(p)
                if shards is not None:
                    if not (is_sharded(m) and is_sharded(v)):   # not sharded like the parameter
                        continue
                    m, v = m.to_local(), v.to_local()
                if stream is not None:
                    for t in (m, v):
                        if t.is_cuda:
                            t.record_stream(stream)
                group = self._group[p]
                betas = tuple(float(b) for b in group.get("betas", (0.9, 0.999)))
                found.append((info, (m, v, st["step"], betas, float(group.get("eps", 1e-8)), info.shape)))
                groups.append(shards[0].group if shards is not None else None)
            # all parameters together: on CPU one native kernel call (each state read once)
            sums = error_sums_all([args for _, args in found])
            all_reduce_by_group([(t, g) for t, g in zip(sums, groups) if g is not None])
            return [info for info, _ in found], _to_host(sums, stream)


def _unsharded_terms(jobs: list, terms: list, work: dict, largest: int) -> None:
    """The SNR terms of each (view, [(index, subset)]) job into ``terms[index]``: the fp32 CPU views
    in one call of the native kernel (`native.snr_sums`) where it is available, the CUDA views in
    a handful of Triton launches per device (`gpu.snr_sums`) where Triton is installed; the others a
    view's subsets together (`snr_terms_many`), and views of one shape, dtype, device and subsets stacked, up to
    `largest` entries (the largest view's scratch, at most `CHUNK`) at a time
    (`snr_sums_stacked`), so that many small same-shaped tensors (every layer's q, k, v, ...) cost
    the ops of a few; the temporaries are then a stack and its deviations, each no bigger than
    the largest view's scratch."""
    from lowmem.compress.optim import native

    def kernel_terms(taken: list, sums: list[torch.Tensor]) -> None:
        if not taken:
            return
        rows = torch.cat(sums)   # one division for all (on a GPU: a few launches, not a few per view)
        done = iter((rows[:, :3] / rows[:, 3:]).to(torch.float32))
        for _, new in taken:
            for index, _ in new:
                terms[index] = next(done)

    if any(native.snr_reads(x) for x, _ in jobs) and native.available():
        # fp32 CPU views: one native kernel call for all, each view read once for all its subsets
        fast = [(x, new) for x, new in jobs if native.snr_reads(x)]
        jobs = [(x, new) for x, new in jobs if not native.snr_reads(x)]
        kernel_terms(fast, native.snr_sums([(x, [s for _, s in new]) for x, new in fast]))
    if any(x.is_cuda for x, _ in jobs):
        from lowmem.compress.optim import gpu

        devices: dict[torch.device, list] = {}
        for job in jobs:
            if job[0].is_cuda and gpu.measurement_runs("snr") and gpu.snr_reads(job[0]):
                devices.setdefault(job[0].device, []).append(job)
        for taken in devices.values():
            sums = gpu.measured("snr", lambda: gpu.snr_sums([(x, [s for _, s in new]) for x, new in taken]))
            if sums is not None:
                kernel_terms(taken, sums)
                done = {id(job) for job in taken}
                jobs = [job for job in jobs if id(job) not in done]
    groups: dict[tuple, list] = {}
    for x, new in jobs:
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        key = (tuple(x.shape), tuple(s for _, s in new), dtype, x.device)
        groups.setdefault(key, []).append((x, new))
    for (shape, subsets, dtype, device), members in groups.items():
        n = math.prod(shape)
        per = max(1, min(CHUNK, largest) // max(1, n))   # a stack is no bigger than the largest view's own scratch
        # deviations: a view's chunk (`work_size`, within `largest`), or a whole stack
        buf = _scratch(work, device, dtype, largest)
        for first in range(0, len(members), per):
            batch = members[first:first + per]
            if len(batch) == 1:
                x, new = batch[0]
                for (index, _), t in zip(new, snr_terms_many(x, list(subsets), buf)):
                    terms[index] = t
                continue
            stacked = _scratch(work, device, dtype, len(batch) * n, "stack")[: len(batch) * n].view(len(batch), *shape)
            for row, (x, _) in zip(stacked, batch):
                row.copy_(x)
            for k, sums in enumerate(snr_sums_stacked(stacked, list(subsets), buf)):
                values = sums[:, :3] / sums[:, 3:]
                for (_, new), t in zip(batch, values):
                    terms[new[k][0]] = t


def _scratch(work: dict, device: torch.device, dtype: torch.dtype, need: int, kind: str = "work") -> torch.Tensor:
    """A buffer of at least `need` entries from `work`, kept per (device, dtype, kind)."""
    buf = work.get((device, dtype, kind))
    if buf is None or buf.numel() < need:
        buf = work[(device, dtype, kind)] = torch.empty(need, dtype=dtype, device=device)
    return buf


def _precision_samples(step: int, found: list[ParamInfo], sums: dict[int, torch.Tensor]) -> list[PrecisionSample]:
    """The `PrecisionSample`s of the parameters `found`, from their sums on the host by position."""
    samples = []
    for i, info in enumerate(found):
        for which, fmt, state_error, update_error in errors_from_sums(sums[i].tolist(), info.shape):
            samples.append(PrecisionSample(step, info.name, tuple(info.shape), which, fmt, state_error, update_error))
    return samples


class _Pending:
    """A launched measurement: its step, its SNR rows and numbers, its precision numbers (None
    where it measures none), and the event after which they are on the host (None: they are already)."""

    def __init__(self, step: int, snr, precision, done):
        self.step, self.snr, self.precision, self.done = step, snr, precision, done


def _to_host(tensors: list[torch.Tensor], stream) -> dict[int, torch.Tensor]:
    """The 1-D tensors (any lengths) in one transfer per device, as {position: host tensor}: on a
    side stream into pinned memory without waiting (valid once the stream's event has passed)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    host: dict[int, torch.Tensor] = {}
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices]).double()
        if stream is not None and flat.device.type == "cuda":
            pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            pinned.copy_(flat, non_blocking=True)
            flat = pinned
        else:
            flat = flat.cpu()
        for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            host[i] = part
    return host


def _side_stream(params: list[torch.Tensor], sharded: bool):
    """The side stream of ``stream=True``: a new CUDA stream on the parameters' one device."""
    devices = {p.device for p in params}
    if sharded or len(devices) != 1 or next(iter(devices)).type != "cuda":
        where = "sharded parameters" if sharded else ", ".join(sorted(str(d) for d in devices)) or "no parameters"
        raise ValueError(f"stream=True measures on a CUDA side stream and needs every tracked parameter on one "
                         f"CUDA device, unsharded; found {where}. Leave stream off (the default): the "
                         "measurement then runs on the training stream.")
    return torch.cuda.Stream(next(iter(devices)))


def _check_belongs(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Refuse an optimizer none of whose parameters are `model`'s; warn when only some are."""
    ours = {id(p) for p in model.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in ours for p in params)
    if params and foreign == len(params):
        raise ValueError(f"none of the optimizer's {len(params):,} parameters belong to the model "
                         f"({type(model).__name__}, {len(ours):,} parameters): capture would measure nothing. "
                         "Pass the model this optimizer trains.")
    if foreign:
        warnings.warn(f"lowmem: {foreign:,} of the optimizer's {len(params):,} parameters are not the model's "
                      f"({type(model).__name__}); capture measures the other {len(params) - foreign:,}",
                      stacklevel=3)


class _ShardedMeasurement:
    """The SNR terms of sharded `v`s (see `lowmem.sharding`), in two all-reduces per process group.

    A (view, subset) whose slices each rank holds whole gives per-rank sums of the kept slices'
    ratios, mean² and var, and their count; summed over ranks they are the whole `v`'s. Otherwise
    pass 1 sums each box of this rank's range into the kept entries (all-reduced: the slice means),
    and pass 2 sums the squared deviations from those means (all-reduced: the variances).
    """

    def __init__(self):
        self.local: list[tuple[int, torch.Tensor, object]] = []            # (index, sums, group)
        self.spread: list[tuple[int, ShardedRegion, torch.Tensor, object, torch.Tensor]] = []

    def add(self, index: int, region: ShardedRegion, x: torch.Tensor, group, buf: torch.Tensor) -> None:
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if region.is_local:
            self.local.append((index, snr_sums(x.reshape(region.local_shape), region.local_reduce, buf), group))
            return
        flat = x.reshape(-1)
        # Sums in float64, as `snr_sums`' mean: a constant slice's mean is then exact, its variance 0.
        sums = torch.zeros(region.kept_shape, dtype=torch.float64, device=x.device)
        for box in region.boxes:
            sums[box.kept_index(region.reduce)] += region.piece(flat, box).sum(dim=region.reduce, keepdim=True,
                                                                               dtype=torch.float64)
        self.spread.append((index, region, flat, group, sums))

    def finish(self, terms: list[torch.Tensor | None]) -> None:
        all_reduce_by_group([(sums, g) for _, _, _, g, sums in self.spread])
        squares = []
        for i, (index, region, flat, group, sums) in enumerate(self.spread):
            mean = sums.div_(region.count).to(flat.dtype)
            self.spread[i] = (index, region, flat, group, mean)
            sq = torch.zeros_like(mean)
            for box in region.boxes:
                k = box.kept_index(region.reduce)
                dev = region.piece(flat, box) - mean[k]
                sq[k] += dev.mul_(dev).sum(dim=region.reduce, keepdim=True)
            squares.append(sq)
        all_reduce_by_group([(sq, g) for sq, (*_, g, _) in zip(squares, self.spread)]
                            + [(sums, g) for _, sums, g in self.local])
        for (index, region, _, _, mean), sq in zip(self.spread, squares):
            sums = slice_sums(mean, sq.div_(region.count))
            terms[index] = sums[:3] / sums[3]
        for index, sums, _ in self.local:
            terms[index] = sums[:3] / sums[3]


def capture(optimizer: torch.optim.Optimizer, model: nn.Module, every: int = 10,
            out: str | os.PathLike | None = None, shadow: bool = False, **kwargs) -> SnrCapture:
    """Attach SNR capture to `optimizer`; use as a context manager (see the module docstring)."""
    return SnrCapture(optimizer, model, every=every, out=out, shadow=shadow, **kwargs).attach()
