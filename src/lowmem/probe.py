"""The probe run: train a task with Adam for a few hundred steps while capturing the SNR of `v`.

A *task* is what a `model.py` provides (DESIGN §7): ``build_model()``, ``get_batch(step)``,
``loss_fn(model, batch)``, optionally ``build_optimizer(model)`` and ``LOWMEM`` defaults. The
probe checks every value the user's code returns and turns a broken contract into a
`TaskError` naming the function, what was expected and what was found.
"""

from __future__ import annotations

import math
import os
import sysconfig
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lowmem.layers import ModelLayers, resolve_layers
from lowmem.snr.capture import SnrCapture

DEFAULTS = {"steps": 500, "lr": 3e-4, "every": 10}


class TaskError(RuntimeError):
    """The user's code failed or broke the `model.py` contract (exit code 3)."""


class NonFiniteLossError(TaskError):
    """The loss became NaN or infinite; `step` is the `get_batch` step it happened at."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss is {value} at step {step} (get_batch({step})); stopped before the "
                         "optimizer step, so every SNR sample taken so far is kept. Lower the learning rate "
                         "(--lr) or check the data")
        self.step, self.value = step, value


@dataclass
class Task:
    """What the probe needs from a `model.py` (or a built-in example)."""

    build_model: Callable[[], nn.Module]
    get_batch: Callable[[int], Any]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    defaults: dict = field(default_factory=dict)
    source: str = "?"
    get_val_batch: Callable[[int], Any] | None = None   # held-out batch i; None: no held-out split


@dataclass
class ProbeResult:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    capture: SnrCapture
    layers: ModelLayers
    steps_done: int = 0
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    nonfinite: NonFiniteLossError | None = None   # set when a NaN/inf loss stopped the run


def call_user(task: Task, what: str, fn, *args):
    """Call user code; its exceptions become a `TaskError` carrying the user's frames."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, TaskError):
        raise
    except Exception as e:
        raise TaskError(f"{what} in {task.source} raised {type(e).__name__}: {e}\n{_where(e)}") from e


# Frames from these folders are not the task's code: lowmem itself (but for its built-in
# examples), torch, the standard library and installed packages.
_LOWMEM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")
_EXAMPLES_DIR = os.path.join(_LOWMEM_DIR, "examples", "")
_LIBRARY_DIRS = (_LOWMEM_DIR, os.path.join(os.path.dirname(torch.__file__), ""),
                 *(os.path.join(os.path.abspath(d), "") for d in
                   (sysconfig.get_paths().get(k) for k in ("stdlib", "purelib", "platlib")) if d))


def _where(e: BaseException) -> str:
    """The last frames of the task's own code in `e`'s traceback, then the frame that raised it."""
    frames = traceback.extract_tb(e.__traceback__)
    paths = [os.path.abspath(f.filename) for f in frames]
    own = [f for f, path in zip(frames, paths) if path.startswith(_EXAMPLES_DIR) or not path.startswith(_LIBRARY_DIRS)]
    shown = own[-3:]
    if frames and (not shown or shown[-1] is not frames[-1]) and not paths[-1].startswith(_LOWMEM_DIR):
        shown.append(frames[-1])   # where a library (e.g. torch) rejected what the task's code passed
    return "".join(traceback.format_list(shown or frames[-1:])).rstrip()


def to_device(batch, device: torch.device):
    """Move the tensors of a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [to_device(b, device) for b in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def build(task: Task, device: torch.device, lr: float, seed: int,
          with_optimizer: bool = True) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """The task's model on `device` and its optimizer (AdamW(lr) unless the task builds one; None
    without `with_optimizer`, for callers that do not train)."""
    torch.manual_seed(seed)
    model = call_user(task, "build_model()", task.build_model)
    if not isinstance(model, nn.Module):
        raise TaskError(f"build_model() in {task.source} must return a torch.nn.Module, "
                        f"it returned {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise TaskError(f"build_model() in {task.source} returned a {type(model).__name__} with no "
                        "trainable parameters")
    model.to(device).train()
    if not with_optimizer:
        return model, None
    if task.build_optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        optimizer = call_user(task, "build_optimizer(model)", task.build_optimizer, model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TaskError(f"build_optimizer(model) in {task.source} must return a torch.optim.Optimizer, "
                            f"it returned {type(optimizer).__name__}")
    return model, optimizer


def run_probe(task: Task, steps: int, every: int, lr: float, device: torch.device | str = "cpu",
              out: str | os.PathLike | None = None, seed: int = 0, shadow: bool = False,
              on_step: Callable[[int, float], None] | None = None,
              on_start: Callable[[nn.Module, ModelLayers], None] | None = None) -> ProbeResult:
    """Train `task` for `steps` steps with capture attached; stop cleanly on Ctrl-C.

    Args:
        task: the user's task.
        steps: optimizer steps to run.
        every: measure the SNR every `every` optimizer steps.
        lr: learning rate of the default AdamW (ignored when the task builds its optimizer).
        device: where to train.
        out: trajectory CSV, streamed.
        seed: `torch.manual_seed` before `build_model()`.
        shadow: estimate `v` from gradients (for optimizers without ``exp_avg_sq``).
        on_step: called with (steps done, loss) after every step.
        on_start: called with (model, layers) once they are built, before the first step (the CLI
            writes ``layers.json`` there, so even a killed run can be reported).

    Returns:
        A `ProbeResult`; ``interrupted`` is True when Ctrl-C stopped it, ``nonfinite`` holds the
        error when a NaN/inf loss stopped it (before that step's update, so every sample is kept).

    Raises:
        TaskError: the user's code failed or broke the contract (the trajectory file is kept).
    """
    device = torch.device(device)
    model, optimizer = build(task, device, lr, seed)
    layers = resolve_layers(model)
    if on_start is not None:
        on_start(model, layers)
    cap = SnrCapture(optimizer, model, every=every, out=out, shadow=shadow, layers=layers)
    result = ProbeResult(model, optimizer, cap, layers)
    cap.attach()
    try:
        for step in range(steps):
            batch = to_device(call_user(task, f"get_batch({step})", task.get_batch, step), device)
            loss = call_user(task, "loss_fn(model, batch)", task.loss_fn, model, batch)
            check_loss(task, loss, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                result.nonfinite = NonFiniteLossError(step, value)
                break
            call_user(task, "loss.backward()", loss.backward)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps_done = step + 1
            result.losses.append(value)
            if on_step is not None:
                on_step(step + 1, value)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        cap.close()
    return result


def check_loss(task: Task, loss, step: int, needs_grad: bool = True, where: str | None = None) -> None:
    """Refuse a loss that is not a scalar tensor (with a gradient, for training); `where` names the
    batch in the message (default ``at step STEP``)."""
    where = where or f"at step {step}"
    if not isinstance(loss, torch.Tensor):
        raise TaskError(f"loss_fn(model, batch) in {task.source} must return a scalar torch.Tensor, "
                        f"it returned {type(loss).__name__} {where}")
    if loss.numel() != 1:
        raise TaskError(f"loss_fn(model, batch) in {task.source} must return a scalar (mean-reduced) loss, "
                        f"it returned a tensor of shape {tuple(loss.shape)} {where}; "
                        "use reduction='mean' or call .mean()")
    if needs_grad and not loss.requires_grad:
        raise TaskError(f"loss_fn(model, batch) in {task.source} returned a loss that does not require grad "
                        f"{where}: is the model used inside loss_fn, and not under torch.no_grad()?")
