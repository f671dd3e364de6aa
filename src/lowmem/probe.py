"""The probe run: train a task with Adam for a few hundred steps while capturing the SNR of `v`.

A *task* is what a `model.py` provides (DESIGN §7): ``build_model()``, ``get_batch(step)``,
``loss_fn(model, batch)``, optionally ``build_optimizer(model)`` and ``LOWMEM`` defaults. The
probe checks every value the user's code returns and turns a broken contract into a
`TaskError` naming the function, what was expected and what was found.
"""

from __future__ import annotations

import inspect
import math
import os
import sysconfig
import traceback
from collections.abc import Iterator
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
    """Call user code; its exceptions, and its ``sys.exit()``, become a `TaskError` carrying the
    user's frames (Ctrl-C stays a KeyboardInterrupt)."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, TaskError):
        raise
    except (Exception, SystemExit) as e:
        raise user_failure(what, task.source, e) from e


def user_failure(what: str, source: str, e: BaseException) -> TaskError:
    """The `TaskError` for user code `what` of `source` that raised `e`: user code that exits has
    failed too, since lowmem calls it as a function and cannot go on without its result."""
    if isinstance(e, SystemExit):
        return TaskError(f"{what} in {source} called sys.exit({e.code!r}): it must return, not exit the "
                         f"program\n{_where(e)}".rstrip())
    if isinstance(e, TypeError) and len(traceback.extract_tb(e.__traceback__)) == 1:
        # Raised by the call itself, before any line of the function ran: another signature.
        return TaskError(f"{what} in {source} cannot be called that way ({e}): the model.py contract calls it as {what}")
    hint = ""
    if isinstance(e, StopIteration):
        hint = " (an iterator ran out of data?)"
    elif what == "loss.backward()" and "a second time" in str(e):
        hint = " (does loss_fn call backward() itself? lowmem calls loss.backward() on the loss it returns)"
    return TaskError(f"{what} in {source} raised {type(e).__name__}: {e}{hint}\n{_where(e)}".rstrip())


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
        hint = ""
        if isinstance(model, type) and issubclass(model, nn.Module):
            hint = f" (the class {model.__name__} itself: return an instance, {model.__name__}(...))"
        elif isinstance(model, (tuple, list)):
            hint = "; return the model alone (build_optimizer(model) makes the optimizer)"
        raise TaskError(f"build_model() in {task.source} must return a torch.nn.Module, "
                        f"it returned {type(model).__name__}{hint}")
    if device.type != "meta":   # `lowmem-analyze memory --meta` builds there on purpose: shapes suffice
        _check_materialised(task, model)
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
            hint = "; return the optimizer alone" if isinstance(optimizer, (tuple, list)) else ""
            raise TaskError(f"build_optimizer(model) in {task.source} must return a torch.optim.Optimizer, "
                            f"it returned {type(optimizer).__name__}{hint}")
        mine = {id(p) for p in model.parameters()}
        if not any(id(p) in mine for group in optimizer.param_groups for p in group["params"]):
            raise TaskError(f"build_optimizer(model) in {task.source} returned an optimizer ({type(optimizer).__name__}) "
                            "over none of the model's parameters: build it from the model it is given, e.g. "
                            f"{type(optimizer).__name__}(model.parameters(), ...)")
    return model, optimizer


def _check_materialised(task: Task, model: nn.Module) -> None:
    """Refuse a model with tensors on the meta device: they have shapes but no values to train."""
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        total = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
        raise TaskError(f"build_model() in {task.source} returned a {type(model).__name__} with {len(meta)} of {total} "
                        f"parameters and buffers on the meta device (e.g. {meta[0]}): they have a shape but no "
                        "values. Materialise the model before returning it: model.to_empty(device='cpu'), then "
                        "initialise the weights (e.g. reset_parameters() on each module)")


def run_probe(task: Task, steps: int, every: int, lr: float, device: torch.device | str = "cpu",
              out: str | os.PathLike | None = None, seed: int = 0, shadow: bool = False,
              on_step: Callable[[int, float], None] | None = None,
              on_start: Callable[[nn.Module, ModelLayers], None] | None = None,
              precision_out: str | os.PathLike | None = None, stream: bool = False,
              precision_every: int | None = None) -> ProbeResult:
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
        precision_out: precision CSV, streamed: at each measurement the error each storage format
            of `m` and `v` causes (`lowmem.snr.precision`; none in shadow mode).
        precision_every: measure the precision only at the first measurement and at steps that
            are multiples of this (a multiple of `every`); default: at every measurement.
        stream: measure on a CUDA side stream (`lowmem.snr.capture`, ``stream=True``).

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
    cap = SnrCapture(optimizer, model, every=every, out=out, shadow=shadow, layers=layers,
                     precision_out=precision_out, precision_every=precision_every, stream=stream)
    result = ProbeResult(model, optimizer, cap, layers)
    cap.attach()
    try:
        for step in range(steps):
            batch = to_device(batch_at(task, step), device)
            loss = call_user(task, "loss_fn(model, batch)", task.loss_fn, model, batch)
            check_loss(task, loss, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                result.nonfinite = NonFiniteLossError(step, value)
                break
            call_user(task, "loss.backward()", loss.backward)
            if step == 0:
                check_gradients(task, model, step)
            _optimizer_step(task, optimizer)
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


def _optimizer_step(task: Task, optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``; a failure inside an optimizer from the task's build_optimizer (one
    that needs a closure, say) is the task's, one in lowmem's capture hook or AdamW is lowmem's."""
    try:
        optimizer.step()
    except Exception as e:
        inner = [os.path.abspath(f.filename) for f in traceback.extract_tb(e.__traceback__)[1:]]
        if task.build_optimizer is None or any(path.startswith(_LOWMEM_DIR) for path in inner):
            raise
        hint = " (lowmem calls optimizer.step() without a closure)" if "closure" in str(e) else ""
        raise TaskError(f"optimizer.step() of the {type(optimizer).__name__} from build_optimizer(model) in "
                        f"{task.source} raised {type(e).__name__}: {e}{hint}\n{_where(e)}".rstrip()) from e


def batch_at(task: Task, step: int):
    """``get_batch(step)`` of the task, refused when it is no batch: None, or a generator or
    iterator (a ``yield`` in get_batch, or a data loader's iterator returned whole)."""
    batch = call_user(task, f"get_batch({step})", task.get_batch, step)
    if batch is None:
        raise TaskError(f"get_batch({step}) in {task.source} returned None: it must return the batch for step "
                        f"{step} (tensors, a tuple or a dict); is a `return` missing?")
    if isinstance(batch, Iterator):
        what = "a generator (get_batch uses `yield`)" if inspect.isgenerator(batch) else f"an iterator ({type(batch).__name__})"
        raise TaskError(f"get_batch({step}) in {task.source} returned {what}: it must return the batch for step "
                        f"{step} itself, e.g. `return x, y` (or next(iterator))")
    return batch


def check_loss(task: Task, loss, step: int, needs_grad: bool = True, where: str | None = None) -> None:
    """Refuse a loss that is not a floating-point scalar tensor (computed from the model, for
    training); `where` names the batch in the message (default ``at step STEP``)."""
    where = where or f"at step {step}"
    if not isinstance(loss, torch.Tensor):
        hint = "; return the loss alone (a tuple or dict of outputs is not a loss)" if isinstance(loss, (tuple, list, dict)) else ""
        raise TaskError(f"loss_fn(model, batch) in {task.source} must return a scalar torch.Tensor, "
                        f"it returned {type(loss).__name__} {where}{hint}")
    if loss.numel() != 1:
        raise TaskError(f"loss_fn(model, batch) in {task.source} must return a scalar (mean-reduced) loss, "
                        f"it returned a tensor of shape {tuple(loss.shape)} {where}; "
                        "use reduction='mean' or call .mean()")
    if not loss.is_floating_point():
        raise TaskError(f"loss_fn(model, batch) in {task.source} must return a floating-point loss, it returned a "
                        f"tensor of dtype {loss.dtype} {where}: compute it from the model's output")
    if needs_grad and not loss.requires_grad:
        raise TaskError(f"loss_fn(model, batch) in {task.source} returned a loss that does not require grad "
                        f"{where}: is the model used inside loss_fn, and not under torch.no_grad()?")
    if needs_grad and loss.grad_fn is None:
        raise TaskError(f"loss_fn(model, batch) in {task.source} returned a leaf tensor {where} (e.g. "
                        "torch.tensor(..., requires_grad=True)), which no model parameter can have made: compute "
                        "the loss from model(...) inside loss_fn")


def check_gradients(task: Task, model: nn.Module, step: int) -> None:
    """After ``loss.backward()``: refuse a loss that gave no trainable parameter of `model` a
    gradient (it does not depend on the model: made from the batch alone, or from a model other
    than the one loss_fn was given). The optimizer would skip every parameter and nothing be measured."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and all(p.grad is None for p in trainable):
        raise TaskError(f"loss_fn(model, batch) in {task.source} returned a loss that does not depend on the model's "
                        f"parameters: after loss.backward() at step {step} none of the {len(trainable):,} trainable "
                        "parameters of the model from build_model() has a gradient. Compute the loss from "
                        "model(...) with the `model` that loss_fn is given (not a model of its own or a global one)")
