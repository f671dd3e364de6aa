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

Shadow-v mode (``shadow=True``) keeps ``v ← β2 v + (1−β2) g²`` from the gradients itself, for
optimizers that keep no ``exp_avg_sq`` (SGD, Adafactor, lowmem's own optimizers); it costs one
full-size tensor per parameter and counts steps by hook calls.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from lowmem.layers import ModelLayers, ParamInfo, normalize_name, resolve_layers, sharded_parameters
from lowmem.snr.estimator import axis_subsets, snr_terms
from lowmem.snr.trajectory import Sample, TrajectoryWriter
from lowmem.snr.views import View, param_views, unsplit_subset


class NoAdamStateError(RuntimeError):
    """The optimizer keeps no ``exp_avg_sq`` for any parameter (and shadow mode is off)."""


class SnrCapture:
    """A step post-hook on `optimizer` that measures the SNR of `v` every `every` steps.

    Args:
        optimizer: a torch optimizer over (some of) `model`'s parameters.
        model: the model, used for names, roles and heads (`lowmem.layers.resolve_layers`).
        every: measure when ``state["step"] % every == 0``.
        out: trajectory CSV path, streamed (see `lowmem.snr.trajectory`); None keeps samples in memory only.
        shadow: keep a shadow `v` from the gradients instead of reading ``exp_avg_sq``.
        beta2: decay of the shadow `v`; default the optimizer's ``betas[1]`` or 0.999.
        layers: pre-resolved layers (default: resolved from `model`).
        on_sample: called with each measurement's samples (e.g. to update a progress display).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, every: int = 10,
                 out: str | os.PathLike | None = None, shadow: bool = False,
                 beta2: float | None = None, layers: ModelLayers | None = None,
                 on_sample: Callable[[list[Sample]], None] | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        sharded = sharded_parameters(model)
        if sharded:   # one shard's v is not the parameter's v: its SNR would be wrong, not approximate
            name, placements = next(iter(sharded.items()))
            raise NotImplementedError(f"parameter {name!r} is a DTensor sharded as {placements} (FSDP2 / tensor "
                                      "parallel): capture does not support sharded parameters yet; capture a "
                                      "single-process or DistributedDataParallel run")
        self.optimizer = optimizer
        self.every = every
        self.shadow = shadow
        self.layers = layers if layers is not None else resolve_layers(model)
        self.on_sample = on_sample
        self.samples: list[Sample] = []
        self.measured_steps: list[int] = []
        self._writer = TrajectoryWriter(out) if out is not None else None
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
        for group in optimizer.param_groups:
            for p in group["params"]:
                info = names.get(id(p))
                if info is None:
                    continue
                views = param_views(info)
                self._tracked.append((p, info, views, [axis_subsets(len(v.shape)) for v in views]))
        self._largest = max((p.numel() for p, *_ in self._tracked), default=0)

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self) -> "SnrCapture":
        if self._handle is None:
            self._handle = self.optimizer.register_step_post_hook(self._hook)
            self._known_step = None   # steps taken while detached are not in the hook count
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def close(self):
        """Detach and move the trajectory file into place (safe to call twice)."""
        self.detach()
        if self._writer is not None:
            return self._writer.close()
        return None

    def __enter__(self) -> "SnrCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def path(self):
        return self._writer.path if self._writer else None

    # -- the hook --------------------------------------------------------------------------
    def _hook(self, optimizer, args, kwargs) -> None:
        self._calls += 1
        if self.shadow:
            self._update_shadow()
            step = self._calls
        else:
            step = self._current_step()
            if step is None:
                return
        if step % self.every == 0 and step != self._last_measured:
            self.measure(step)

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
        """Measure every tracked parameter now; one host transfer per device."""
        pending: dict[torch.device, list[torch.Tensor]] = {}
        rows: list[tuple[torch.device, int, ParamInfo, View, tuple[int, ...]]] = []
        # One scratch buffer per device and dtype for the deviations, instead of a full-size
        # temporary per subset: on CPU those allocations slowed the next training steps.
        work: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        with torch.no_grad():
            for p, info, views, subsets in self._tracked:
                v = self._v_of(p)
                if v is None or tuple(v.shape) != tuple(info.shape):
                    continue
                v = v.detach()
                dtype = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
                buf = work.get((v.device, dtype))
                if buf is None or buf.numel() < v.numel():
                    buf = work[(v.device, dtype)] = torch.empty(self._largest, dtype=dtype, device=v.device)
                terms = pending.setdefault(v.device, [])
                done: dict[tuple[str, tuple[int, ...]], int] = {}
                for view, subs in zip(views, subsets):
                    x = view.apply(v)
                    for s in subs:
                        # A head-view subset equal to an unsplit one reuses its numbers.
                        same = unsplit_subset(view, s)
                        index = done.get(same) if same else None
                        if index is None:
                            index = done[(view.name, s)] = len(terms)
                            terms.append(snr_terms(x, s, buf))
                        rows.append((v.device, index, info, view, s))
            host = {dev: torch.stack(ts).double().cpu() for dev, ts in pending.items()}
        samples = []
        for dev, i, info, view, s in rows:
            snr, mean_sq, var = host[dev][i].tolist()
            samples.append(Sample(step, info.name, "x".join(map(str, info.shape)), view.label(),
                                  ",".join(map(str, s)), snr, mean_sq, var))
        self.samples.extend(samples)
        self.measured_steps.append(step)
        self._last_measured = step
        if self._writer is not None:
            self._writer.write(samples)
        if self.on_sample is not None:
            self.on_sample(samples)
        return samples


def capture(optimizer: torch.optim.Optimizer, model: nn.Module, every: int = 10,
            out: str | os.PathLike | None = None, shadow: bool = False, **kwargs) -> SnrCapture:
    """Attach SNR capture to `optimizer`; use as a context manager (see the module docstring)."""
    return SnrCapture(optimizer, model, every=every, out=out, shadow=shadow, **kwargs).attach()
