"""Train one task with several optimizers over a learning-rate grid, from the same start.

Every run starts from the same initial weights (one `build_model()` under the seed, copied, cast
to the sweep's `param_dtype`) and sees the same batches (`get_batch(step)` for step 0 … N−1, checked by hashing them), with the
same warm-up and cosine schedule. A run records its training-loss curve, held-out loss at each
evaluation, its Euclidean distance to AdamW's weights at the same steps and learning rate (as
Zhang et al., *Adam-mini*, 2024, Figure 16), the optimizer-state bytes and its step time.

An optimizer is named by a spec (`parse_spec`): a registry name (`OPTIMIZERS`), a peer's
(`PEER_NAMES`: torchao's and bitsandbytes' 8-/4-bit AdamW, optional packages; torch's Muon with
AdamW beside it), ``module:Class[:{json}]`` for any other optimizer class, or ``plan``, and
for lowmem's plan optimizers a storage format of `m` and `v` after colons: ``eve:int8`` (`m` in
int8), ``slimadam:int8:int8`` (`m` and `v`), ``plan:bf16:bf16``. Colons survive a comma-separated
list; in file names they are written ``+`` (``runs/eve+int8@0.001.json``), which no name holds.

Nothing is lost to an interruption: each finished run is written to ``runs/NAME@LR.json`` as
it ends (AdamW's weights at the evaluation steps beside it, for the distances), and
``compare.csv`` / ``curves.csv`` are rewritten from all finished runs; running the same sweep
again skips them. ``settings.json`` pins what a run depends on, so a folder never mixes sweeps.

Files (the report reads them, `lowmem.reports.run`):

``compare.csv``: `COMPARE_COLUMNS` plus ``opt_step_seconds``, ``init_sha``, ``batches_sha``, one
row per (optimizer, lr) run in sweep order. ``final_train_loss`` is the mean training loss of
the last `tail` steps (a single batch is noisy); ``final_val_loss`` the mean loss over
``eval_batches`` held-out batches after the last step (empty without a held-out split; in
fp32 for bf16 runs, ``eval_dtype``);
``status`` is ``complete`` or ``diverged`` (a NaN/inf loss stopped it); ``state_bytes`` counts
the optimizer's state tensors but its step counters; ``step_seconds`` is the median time of a
whole training step (forward, backward, optimizer), ``opt_step_seconds`` of `optimizer.step()`.

``state_format``: the format the spec asked for (``m=int8,v=fp32``); empty where the optimizer
keeps its own (fp32 for lowmem's unless ``--plan`` has ``state`` entries; torch's AdamW keeps
its state in the parameters' dtype; the peers their own 8-/4-bit codes).

``curves.csv``: `CURVE_COLUMNS`, one row per run and step; ``val_loss`` and
``distance_to_adamw`` only at evaluation steps (and step 0), empty elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowmem.compress.formats import M_FORMATS, V_FORMATS, StateFormat
from lowmem.compress.memory import optimizer_state_bytes
from lowmem.compress.optim.engine import ROUNDINGS, ReducedAdamW
from lowmem.compress.optim.registry import NAMES, PEER_NAMES, PEERS, REGISTRY, PeerUnavailable, entry
from lowmem.compress.plan import Plan, plan_digest, write_atomic  # noqa: F401  (plan_digest: where the CLI finds it)
from lowmem.probe import Task, TaskError, batch_at, build, call_user, check_gradients, check_loss, to_device
from lowmem.reports.run import COMPARE_COLUMNS, CURVE_COLUMNS

OPTIMIZERS = NAMES   # every optimizer of the registry, in its order (the default sweep)
KNOWN = (*NAMES, *PEER_NAMES, "plan")   # what a spec may name
EXTRA_COLUMNS = ("opt_step_seconds", "init_sha", "batches_sha", "state_format")
SCHEMA = "lowmem.compare/1"
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class SweepMismatch(ValueError):
    """The output folder holds runs of a sweep with other settings (a usage error)."""


class SpecError(ValueError):
    """An optimizer spec that names no optimizer or a format it cannot take (a usage error)."""


def takes_format(name: str) -> bool:
    """Whether optimizer `name` keeps its state in a lowmem storage format (the plan engine's)."""
    return name == "plan" or (name in REGISTRY and issubclass(REGISTRY[name].cls, ReducedAdamW))


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer of a sweep: its name, and for lowmem's plan optimizers the storage format of
    its `m` and `v` (None: the optimizer's own, fp32 or the plan's ``state`` entries)."""

    name: str
    state_format: StateFormat | None = None
    options: str = ""     # a ``module:Class`` spec's keyword arguments, as canonical JSON ("" for none)

    @property
    def custom(self) -> bool:
        """Whether the spec names a class by ``module:Class`` rather than a known optimizer."""
        return ":" in self.name

    def __str__(self) -> str:
        if self.custom:
            return self.name + (f":{self.options}" if self.options else "")
        if self.state_format is None:
            return self.name
        f = self.state_format
        return f"{self.name}:{f.m}" + (f":{f.v}" if f.v != "fp32" else "")


def format_names() -> str:
    """The formats a spec may give, for messages."""
    return f"m: {', '.join(M_FORMATS)}; v: {', '.join(V_FORMATS)}"


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs, split at the commas outside a spec's JSON (braces and
    brackets)."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c in "{[") - (c in "}]")
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [x.strip() for x in items if x.strip()]


def _is_class_spec(text: str) -> bool:
    """``module:Class…``: a dotted module, or a name no optimizer has before a capitalised class
    (``eve:BF16`` stays a format: names and formats are read in any case)."""
    head, sep, rest = text.partition(":")
    return bool(sep) and ("." in head or (head.lower() not in KNOWN and rest[:1].isupper()))


def _class_spec(text: str) -> OptimizerSpec:
    module, _, rest = text.partition(":")
    cls, _, options = rest.partition(":")
    if not module or not cls.isidentifier():
        raise SpecError(f"{text!r}: expected module:Class or module:Class:{{json keyword arguments}}, "
                        "e.g. torch.optim:SGD:{\"momentum\": 0.9}")
    if options:
        try:
            kwargs = json.loads(options)
        except json.JSONDecodeError as e:
            raise SpecError(f"{text!r}: the keyword arguments are not JSON ({e}); e.g. "
                            "torch.optim:SGD:{\"momentum\": 0.9}") from None
        if not isinstance(kwargs, dict):
            raise SpecError(f"{text!r}: the keyword arguments must be a JSON object, {{\"name\": value, ...}}")
        options = json.dumps(kwargs, sort_keys=True, separators=(",", ":")) if kwargs else ""
    return OptimizerSpec(f"{module}:{cls}", options=options)


def parse_spec(text: str) -> OptimizerSpec:
    """``NAME``, ``NAME:M`` or ``NAME:M:V``: an optimizer and the storage of its `m` and `v`; or
    ``module:Class`` / ``module:Class:{json}``: any optimizer class, built over the model's
    trainable parameters with the sweep's ``lr`` (and its ``betas`` and ``weight_decay`` where
    the class names them and the JSON does not).

    Raises:
        SpecError: an unknown name, a format given to an optimizer that keeps its own, or an
            unknown format (the known names and formats are in the message); a class spec whose
            keyword arguments are not a JSON object.
    """
    if _is_class_spec(text.strip()):
        return _class_spec(text.strip())
    name, *formats = text.strip().lower().split(":")
    if name not in KNOWN:
        where = f" in {text!r}" if formats else ""
        raise SpecError(f"unknown optimizer {name!r}{where}; known: {', '.join(KNOWN)}")
    if not formats:
        return OptimizerSpec(name)
    if not takes_format(name):
        plan_names = [n for n in KNOWN if takes_format(n)]
        raise SpecError(f"{text!r}: {name} keeps its state its own way and takes no storage format; formats "
                        f"apply to lowmem's plan optimizers ({', '.join(plan_names)})")
    if len(formats) > 2:
        raise SpecError(f"{text!r}: expected NAME, NAME:M or NAME:M:V (formats {format_names()})")
    m, v = (*formats, "fp32")[:2]
    if m not in M_FORMATS or v not in V_FORMATS:
        which, bad = ("m", m) if m not in M_FORMATS else ("v", v)
        raise SpecError(f"{text!r}: {bad!r} is not a storage format of {which}; NAME:M or NAME:M:V with "
                        f"formats {format_names()}")
    return OptimizerSpec(name, StateFormat(m, v))


def unavailable(specs) -> dict[str, str]:
    """The peers and ``module:Class`` specs among `specs` (text or `OptimizerSpec`) that cannot be
    built here (a missing package, a module that does not import, no such class), with why."""
    specs = [s if isinstance(s, OptimizerSpec) else parse_spec(s) for s in specs]
    names = {s.name for s in specs}
    out = {n: reason for n in PEER_NAMES if n in names and (reason := PEERS[n].unavailable()) is not None}
    for s in specs:
        if s.custom:
            try:
                _load_class(s.name)
            except PeerUnavailable as e:
                out[s.name] = str(e)
    return out


def _load_class(name: str) -> type:
    import importlib

    module, cls = name.split(":")
    try:
        found = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise PeerUnavailable(f"optimizer {name!r}: module {module!r} does not import ({e}); it must be "
                              "installed, or a .py file beside model.py") from None
    except AttributeError:
        raise PeerUnavailable(f"optimizer {name!r}: module {module!r} has no {cls!r}") from None
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        raise PeerUnavailable(f"optimizer {name!r}: {module}.{cls} is not a torch.optim.Optimizer class")
    return found


def _class_optimizer(spec: OptimizerSpec, model: nn.Module, lr: float, settings: SweepSettings):
    """A ``module:Class`` spec's optimizer: the class over the trainable parameters (or the model,
    where its first argument is named ``model``, as lowmem's optimizers), with the JSON keyword
    arguments, ``lr``, and ``betas`` / ``weight_decay`` where the class names them."""
    import inspect

    cls, kwargs, takes_model = _class_arguments(spec, lr, settings)
    target = model if takes_model else [p for p in model.parameters() if p.requires_grad]
    try:
        return cls(target, **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"optimizer {str(spec)!r} could not be built: {type(e).__name__}: {e}") from None


def check_class_spec(spec: str | OptimizerSpec, lr: float = 1e-3) -> None:
    """Refuse a ``module:Class`` spec whose class does not take its keyword arguments (SpecError),
    before anything is built or written."""
    spec = spec if isinstance(spec, OptimizerSpec) else parse_spec(spec)
    _class_arguments(spec, lr, SweepSettings(steps=1, warmup=0))


def _class_arguments(spec: OptimizerSpec, lr: float, settings: SweepSettings) -> tuple[type, dict, bool]:
    """(class, keyword arguments, whether it takes the model) of a ``module:Class`` spec.

    Raises:
        PeerUnavailable: the class cannot be loaded; SpecError: its constructor does not take
            these keyword arguments (checked against its signature, before anything is built).
    """
    import inspect

    cls = _load_class(spec.name)
    kwargs = json.loads(spec.options) if spec.options else {}
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        signature = None
    named = signature.parameters if signature is not None else {}
    shared = {"lr": lr, "betas": tuple(settings.betas), "weight_decay": settings.weight_decay}
    for key, value in shared.items():
        if key not in kwargs and (key in named or key == "lr"):
            kwargs[key] = value
    if signature is not None:
        try:
            signature.bind(None, **kwargs)
        except TypeError as e:
            raise SpecError(f"optimizer {str(spec)!r}: {cls.__name__} does not take these arguments ({e}); "
                            f"it takes: {', '.join(list(named)[1:])}") from None
    return cls, kwargs, next(iter(named), None) == "model"


@dataclass(frozen=True)
class SweepSettings:
    """Everything a run's numbers depend on besides its optimizer and learning rate.

    Attributes:
        steps: optimizer steps per run.
        warmup: steps of linear warm-up from lr/warmup to lr.
        schedule: ``"cosine"`` (decay to ``min_lr_ratio``·lr at the last step) or ``"constant"``.
        min_lr_ratio: the cosine schedule's floor, as a share of lr.
        weight_decay: decoupled weight decay of every optimizer.
        betas: (β1, β2) of the Adam-type optimizers and AdaMeM; Adafactor with momentum takes β1
            and keeps its own β2 schedule.
        eval_every: steps between held-out evaluations and distance measurements.
        eval_batches: held-out batches per evaluation (``get_val_batch(0 … n−1)``).
        tail: steps averaged for the final training loss.
        seed: `torch.manual_seed` before building the model and before each run, and the plan
            optimizers' ``rounding_seed``: it changes the initial weights and stochastic
            rounding's draws; the batches are `get_batch`'s.
        slimadam: what SlimAdam runs from: ``"slimadam-rules"`` or the plan's fingerprint.
        task: the task's source, for the record.
        param_dtype: ``"fp32"`` or ``"bf16"``: the model is cast to it after `build_model()`
            (pure low-precision training: the same bf16 start for every optimizer), and so are
            the floating-point tensors of every batch.
        param_rounding: how lowmem's plan optimizers round their fp32 update into bf16
            parameters (``"nearest"``, ``"stochastic"``, ``"kahan"``; `ReducedAdamW`); torch's
            AdamW keeps bf16 state and computes its update in bf16, the peers round to nearest.
            Only ``"nearest"`` with fp32 parameters.
        eval_dtype: the precision of held-out losses: ``"fp32"`` (default) evaluates the model
            with its bf16 weights upcast to fp32 in place for the evaluation (exact; restored
            after; 4 more bytes per parameter meanwhile) on float32 batches, so a bf16 run's
            loss is not rounded to bf16 (about 0.004 apart at a loss of 2.5, as large as the
            gaps being measured); ``"param"`` evaluates the model as it trains, in its dtype.
    """

    steps: int
    warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eval_every: int = 50
    eval_batches: int = 4
    tail: int = 10
    seed: int = 0
    slimadam: str = "slimadam-rules"
    task: str = "?"
    param_dtype: str = "fp32"
    param_rounding: str = "nearest"
    eval_dtype: str = "fp32"

    def __post_init__(self):
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {self.param_dtype!r}")
        if self.param_rounding not in ROUNDINGS:
            raise ValueError(f"param_rounding must be one of {', '.join(ROUNDINGS)}, got {self.param_rounding!r}")
        if self.param_dtype == "fp32" and self.param_rounding != "nearest":
            raise ValueError(f"param_rounding {self.param_rounding!r} rounds into bf16 parameters: it needs "
                             "param_dtype 'bf16'")
        if self.eval_dtype not in ("fp32", "param"):
            raise ValueError(f"eval_dtype must be 'fp32' or 'param', got {self.eval_dtype!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0 <= self.warmup < max(self.steps, 1):
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup} with {self.steps} steps")

    def lr_at(self, step: int, lr: float) -> float:
        """The learning rate of optimizer step `step` (0-based): linear warm-up, then cosine or flat."""
        if step < self.warmup:
            return lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return lr
        span = max(self.steps - 1 - self.warmup, 1)
        progress = (step - self.warmup) / span
        return lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    @property
    def dtype(self) -> torch.dtype:
        return PARAM_DTYPES[self.param_dtype]

    def to_json(self) -> dict:
        return {"schema": SCHEMA, **asdict(self), "betas": list(self.betas)}


# Settings added after settings.json first existed, with the value a folder without them ran at.
_ADDED_SETTINGS = {"param_dtype": "fp32", "param_rounding": "nearest"}


def make_optimizer(spec: str | OptimizerSpec, model: nn.Module, lr: float, settings: SweepSettings,
                   plan: Plan | None = None) -> torch.optim.Optimizer:
    """The optimizer of `spec` (`parse_spec`: a registry name, `OPTIMIZERS`; a peer, `PEER_NAMES`;
    or ``"plan"``: SlimAdam with `plan`, which also replaces the published rules of
    ``"slimadam"``; with a storage format after colons for lowmem's plan optimizers).

    Raises:
        SpecError: a bad spec; PeerUnavailable: a peer whose package is missing; ValueError:
            ``"plan"`` without a plan.
    """
    spec = spec if isinstance(spec, OptimizerSpec) else parse_spec(spec)
    name = spec.name
    if spec.custom:
        return _class_optimizer(spec, model, lr, settings)
    if name == "plan" and plan is None:
        raise ValueError("optimizer 'plan' needs a plan")
    betas = tuple(settings.betas)
    if name in PEERS:
        return PEERS[name].build(model, lr, betas, settings.weight_decay)
    e = REGISTRY["slimadam"] if name == "plan" else entry(name)
    plan = plan if e.name == "slimadam" else None
    if not takes_format(name):
        return e.build(model, lr, betas, settings.weight_decay, plan=plan)
    kwargs = e.hparams(lr, betas, settings.weight_decay)
    if plan is not None:
        kwargs["plan"] = plan
    return e.make(model, **kwargs, state_format=spec.state_format, param_rounding=settings.param_rounding,
                  rounding_seed=settings.seed)


@dataclass
class RunResult:
    """One (optimizer, learning rate) run; see the module docstring for each number."""

    optimizer: str
    lr: float
    status: str
    steps_done: int
    final_train_loss: float | None
    final_val_loss: float | None
    state_bytes: int
    step_seconds: float | None
    opt_step_seconds: float | None
    init_sha: str
    batches_sha: str
    state_format: str = ""
    train_loss: list[float] = field(default_factory=list)                  # per step
    evals: list[tuple[int, float | None, float | None]] = field(default_factory=list)  # (step, val, distance)

    def row(self) -> dict:
        return {"optimizer": self.optimizer, "lr": self.lr, "status": self.status, "steps_done": self.steps_done,
                "final_train_loss": self.final_train_loss, "final_val_loss": self.final_val_loss,
                "state_bytes": self.state_bytes, "step_seconds": self.step_seconds,
                "opt_step_seconds": self.opt_step_seconds, "init_sha": self.init_sha, "batches_sha": self.batches_sha,
                "state_format": self.state_format}

    def to_json(self) -> dict:
        return {**self.row(), "train_loss": self.train_loss, "evals": [list(e) for e in self.evals]}

    @classmethod
    def from_json(cls, doc: dict) -> "RunResult":
        fields = {k: doc[k] for k in ("optimizer", "lr", "status", "steps_done", "final_train_loss", "final_val_loss",
                                      "state_bytes", "step_seconds", "opt_step_seconds", "init_sha", "batches_sha")}
        return cls(**fields, state_format=doc.get("state_format", ""), train_loss=list(doc["train_loss"]),
                   evals=[tuple(e) for e in doc["evals"]])


def _sha_tensors(tensors, h=None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def _batch_tensors(batch):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            yield from _batch_tensors(b)
    elif isinstance(batch, dict):
        for k in sorted(batch, key=str):
            yield from _batch_tensors(batch[k])


def _cast_floats(batch, dtype: torch.dtype, force: bool = False):
    """`batch` with its floating-point tensors in `dtype` (a bf16 model takes bf16 inputs); with
    ``dtype`` float32 they stay as the task made them, unless `force`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() and (force or dtype != torch.float32) else batch
    if isinstance(batch, (list, tuple)):
        cast = [_cast_floats(b, dtype, force) for b in batch]
        return type(batch)(*cast) if hasattr(batch, "_fields") else type(batch)(cast)
    if isinstance(batch, dict):
        return {k: _cast_floats(v, dtype, force) for k, v in batch.items()}
    return batch


@contextlib.contextmanager
def _upcast(model: nn.Module):
    """The model's floating-point parameters and buffers in fp32 for the duration (bf16 → fp32
    is exact), restored after: the same tensor objects (ties, optimizer references) with their
    own storage back. No copy of the model: nothing it holds need be copyable, and the extra
    memory is the fp32 weights (4 bytes per parameter) while it lasts."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    saved = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.float()
        yield model
    finally:
        for t, data in zip(tensors, saved):
            t.data = data


def _cast_model(model: nn.Module, settings: SweepSettings) -> nn.Module:
    """`model` in the sweep's parameter dtype (fp32 sweeps leave it as built)."""
    return model if settings.param_dtype == "fp32" else model.to(dtype=settings.dtype)


def _set_lr(group: dict, lr: float) -> None:
    """Set a group's lr in place where the optimizer keeps it as a tensor (torchao's refuses a float)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in model.parameters() if p.requires_grad])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _val_loss(task: Task, model: nn.Module, settings: SweepSettings, device: torch.device) -> float | None:
    if task.get_val_batch is None or settings.eval_batches == 0:
        return None
    upcast = settings.eval_dtype == "fp32" and settings.dtype != torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (_upcast(model) if upcast else contextlib.nullcontext()):
            losses = []
            for i in range(settings.eval_batches):
                batch = to_device(call_user(task, f"get_val_batch({i})", task.get_val_batch, i), device)
                batch = _cast_floats(batch, torch.float32, force=True) if upcast else _cast_floats(batch, settings.dtype)
                loss = call_user(task, "loss_fn(model, batch)", task.loss_fn, model, batch)
                check_loss(task, loss, i, needs_grad=False, where=f"on held-out batch {i}")
                losses.append(float(loss))
        return sum(losses) / len(losses)
    finally:
        model.train(was_training)


def train_one(task: Task, name: str | OptimizerSpec, lr: float, settings: SweepSettings, base: nn.Module,
              device: torch.device,
              plan: Plan | None = None, reference: dict[int, torch.Tensor] | None = None,
              snapshots: dict[int, torch.Tensor] | None = None,
              on_step: Callable[[int, float], None] | None = None) -> RunResult:
    """Train a copy of `base` with optimizer `name` (a spec, `parse_spec`) at peak learning rate `lr`.

    Args:
        base: the initial model (copied, cast to ``settings.param_dtype``, never trained itself).
        reference: AdamW's flat weights by evaluation step, for ``distance_to_adamw``.
        snapshots: filled with this run's flat weights by evaluation step (for AdamW's run).
        on_step: called with (steps done, loss) after every step.

    Raises:
        TaskError: the user's code failed or broke the contract.
        SpecError, PeerUnavailable: as `make_optimizer`.
    """
    spec = name if isinstance(name, OptimizerSpec) else parse_spec(name)
    model = _cast_model(copy.deepcopy(base), settings).to(device).train()
    init_sha = _sha_tensors(p for p in model.state_dict().values()).hexdigest()
    torch.manual_seed(settings.seed)
    opt = make_optimizer(spec, model, lr, settings, plan)
    batches = hashlib.sha256()
    result = RunResult(str(spec), lr, "complete", 0, None, None, 0, None, None, init_sha, "",
                       state_format=str(spec.state_format) if spec.state_format is not None else "")
    step_times, opt_times = [], []

    def evaluate(step: int) -> bool:
        flat = _flat_params(model) if (reference is not None or snapshots is not None) else None
        if snapshots is not None:
            snapshots[step] = flat.cpu()
        distance = None
        if reference is not None and step in reference:
            distance = float(torch.linalg.vector_norm(flat.cpu() - reference[step]))
        val = _val_loss(task, model, settings, device)
        result.evals.append((step, val, distance))
        return val is None or math.isfinite(val)

    if not evaluate(0):
        result.status = "diverged"
    for step in range(settings.steps if result.status == "complete" else 0):
        for group in opt.param_groups:
            _set_lr(group, settings.lr_at(step, lr))
        batch = batch_at(task, step)
        _sha_tensors(_batch_tensors(batch), batches)
        batch = _cast_floats(to_device(batch, device), settings.dtype)
        _sync(device)
        t0 = time.perf_counter()
        loss = call_user(task, "loss_fn(model, batch)", task.loss_fn, model, batch)
        check_loss(task, loss, step)
        value = float(loss.detach())
        if not math.isfinite(value):
            result.status = "diverged"
            result.train_loss.append(value)
            break
        call_user(task, "loss.backward()", loss.backward)
        if step == 0:
            check_gradients(task, model, step)
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        result.train_loss.append(value)
        result.steps_done = step + 1
        if on_step is not None:
            on_step(step + 1, value)
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            if not evaluate(step + 1):
                result.status = "diverged"
                break
    result.batches_sha = batches.hexdigest()
    result.state_bytes = optimizer_state_bytes(opt).without_step
    result.step_seconds = statistics.median(step_times) if step_times else None
    result.opt_step_seconds = statistics.median(opt_times) if opt_times else None
    if result.status == "complete":
        tail = result.train_loss[-settings.tail:]
        result.final_train_loss = sum(tail) / len(tail) if tail else None
        last = result.evals[-1]
        result.final_val_loss = last[1] if last[0] == result.steps_done else None
    return result


def has_runs(folder: Path, names=None) -> bool:
    """Whether a sweep folder holds a finished run (`names`: as `lowmem.runfolder` asks; unused)."""
    return any((Path(folder) / "runs").glob("*@*.json"))


def run_file(out: Path, name: str, lr: float) -> Path:
    """Where a run of spec `name` is kept (a spec's colons written ``+``: file systems that refuse
    ``:`` take it; a ``module:Class`` spec's JSON arguments as a hash of them)."""
    spec = parse_spec(name)
    stem = str(spec).replace(":", "+")
    if spec.custom and spec.options:
        stem = f"{spec.name.replace(':', '+')}+{hashlib.sha256(spec.options.encode()).hexdigest()[:10]}"
    return out / "runs" / f"{stem}@{lr:g}.json"


def check_settings(out: Path, settings: SweepSettings, init_sha: str) -> None:
    """Write ``settings.json``, or refuse when the folder holds a sweep with other settings or
    another model (`init_sha`: the hash of the initial weights)."""
    path = out / "settings.json"
    doc = {**settings.to_json(), "init_sha": init_sha}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SweepMismatch(f"{path}: unreadable ({e}); remove it or use another --out") from None
        if not isinstance(old, dict):
            raise SweepMismatch(f"{path}: unreadable (not a settings object); remove it or use another --out")
        old = {**_ADDED_SETTINGS, **old}   # a folder from before a setting existed ran at its default
        # before eval_dtype, held-out losses were computed in the parameters' dtype
        old.setdefault("eval_dtype", "fp32" if old.get("param_dtype") == "fp32" else "param")
        if old != doc:
            diff = [f"{k}: {old.get(k)!r} there, {v!r} now" if k != "init_sha" else
                    "initial weights differ (the model or build_model changed)" for k, v in doc.items() if old.get(k) != v]
            why = (" (its bf16 held-out losses were computed in bf16; they are now computed in fp32)"
                   if old.get("eval_dtype") == "param" and doc.get("eval_dtype") == "fp32" else "")
            raise SweepMismatch(f"{out} holds runs of a sweep with other settings ({'; '.join(diff)}){why}; "
                                "use another --out, or --fresh to start over there")
        return
    write_atomic(path, json.dumps(doc, indent=2) + "\n")


def run_sweep(task: Task, optimizers: list[str], lrs: list[float], settings: SweepSettings, out: str | os.PathLike,
              device: torch.device | str = "cpu", plan: Plan | None = None,
              on_run_start: Callable[[str, float, int, int], None] | None = None,
              on_run_done: Callable[[RunResult, bool], None] | None = None,
              on_step: Callable[[int, float], None] | None = None) -> list[RunResult]:
    """Run every (optimizer, lr) not already finished in `out`; AdamW first at each lr.

    Args:
        optimizers: specs (`parse_spec`): names from `OPTIMIZERS` or `PEER_NAMES` (or ``"plan"``
            with `plan`), with a storage format for the plan optimizers.
        lrs: peak learning rates.
        on_run_start: called with (name, lr, index, total) before each run that trains.
        on_run_done: called with (result, resumed) after each run, finished now or earlier.

    Returns:
        All results in sweep order (lr-major, optimizers in the order given, AdamW first).

    Raises:
        SweepMismatch: `out` holds a sweep with other settings.
        SpecError: a bad spec; PeerUnavailable: a peer whose package is missing (both before any run).
        TaskError: the user's code failed; KeyboardInterrupt: the run in progress is lost,
            every finished one is on disk.
    """
    out = Path(out)
    device = torch.device(device)
    specs = [s if isinstance(s, OptimizerSpec) else parse_spec(s) for s in optimizers]
    missing = unavailable(specs)
    if missing:
        raise PeerUnavailable("; ".join(missing.values()))
    for s in specs:
        if s.custom:
            _class_arguments(s, lrs[0], settings)     # a bad keyword: refused before any run
    order = sorted(dict.fromkeys(str(s) for s in specs), key=lambda n: n != "adamw")
    base, _ = build(task, torch.device("cpu"), lrs[0], settings.seed, with_optimizer=False)
    base = _cast_model(base, settings)
    # The initial weights pin the model too: an edited model.py must not join an earlier sweep.
    check_settings(out, settings, _sha_tensors(base.state_dict().values()).hexdigest())
    results: list[RunResult] = []
    total = len(order) * len(lrs)
    for lr in lrs:
        reference = None
        for name in order:
            path = run_file(out, name, lr)
            result = _load_run(path)
            if result is not None:
                results.append(result)
                if on_run_done is not None:
                    on_run_done(result, True)
                if name == "adamw":
                    reference = _load_weights(out, lr)
                continue
            if on_run_start is not None:
                on_run_start(name, lr, len(results), total)
            snapshots = {} if name == "adamw" else None
            result = train_one(task, name, lr, settings, base, device, plan,
                               reference=reference if name != "adamw" else None, snapshots=snapshots, on_step=on_step)
            if snapshots is not None:
                _save_weights(out, lr, snapshots)
                reference = snapshots
            _check_same_batches(task, results, result)
            write_atomic(path, json.dumps(result.to_json(), allow_nan=True) + "\n")
            results.append(result)
            write_tables(out, results)
            if on_run_done is not None:
                on_run_done(result, False)
    write_tables(out, results)
    return results


def _load_run(path: Path) -> RunResult | None:
    """A finished run, or None (to train it) when its file is missing or unreadable."""
    if not path.exists():
        return None
    try:
        return RunResult.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"lowmem: {path} is unreadable ({type(e).__name__}: {e}); training that run again", stacklevel=3)
        return None


def _other_runs(out: Path, results: list[RunResult]) -> list[RunResult]:
    """Finished runs in `out` outside this sweep's grid (same settings: an earlier --lrs or
    --optimizers), so compare.csv keeps every run the folder holds."""
    mine = {(r.optimizer, r.lr) for r in results}
    others = []
    for path in sorted((out / "runs").glob("*@*.json")):
        r = _load_run(path)
        if r is not None and (r.optimizer, r.lr) not in mine:
            others.append(r)
    return sorted(others, key=lambda r: (r.lr, r.optimizer != "adamw", r.optimizer))


def _check_same_batches(task: Task, done: list[RunResult], new: RunResult) -> None:
    """Every run that finished all its steps saw the same batches (hash of every batch tensor)."""
    for r in done:
        if r.status == new.status == "complete" and r.steps_done == new.steps_done and r.batches_sha != new.batches_sha:
            raise TaskError(f"get_batch in {task.source} gave other batches to {new.optimizer} at lr {new.lr:g} than to "
                            f"{r.optimizer} at lr {r.lr:g}: it must be deterministic per step for a fair comparison "
                            "(seed a torch.Generator with the step, as the built-in examples do)")
        if r.init_sha != new.init_sha:
            raise AssertionError(f"runs started from different weights ({r.optimizer}, {new.optimizer})")


def _weights_path(out: Path, lr: float) -> Path:
    return out / "runs" / f"adamw@{lr:g}.weights.pt"


def _save_weights(out: Path, lr: float, snapshots: dict[int, torch.Tensor]) -> None:
    path = _weights_path(out, lr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(snapshots, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_weights(out: Path, lr: float) -> dict[int, torch.Tensor] | None:
    path = _weights_path(out, lr)
    if not path.exists():
        warnings.warn(f"lowmem: {path} is missing: distances to AdamW at lr {lr:g} are left empty", stacklevel=3)
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:   # torch raises several types for a damaged file
        warnings.warn(f"lowmem: {path} is unreadable ({type(e).__name__}); distances to AdamW at lr {lr:g} are "
                      "left empty", stacklevel=3)
        return None


def _cell(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x) if math.isfinite(x) else ("nan" if math.isnan(x) else repr(x))
    return str(x)


def write_tables(out: Path, results: list[RunResult]) -> None:
    """Rewrite ``compare.csv`` and ``curves.csv`` from `results` and any other finished run in
    `out` (each file atomically)."""
    results = [*results, *_other_runs(out, results)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    columns = (*COMPARE_COLUMNS, *EXTRA_COLUMNS)
    w.writerow(columns)
    for r in results:
        row = r.row()
        w.writerow([_cell(row[c]) for c in columns])
    write_atomic(out / "compare.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CURVE_COLUMNS)
    for r in results:
        evals = {s: (v, d) for s, v, d in r.evals}
        v0, d0 = evals.get(0, (None, None))
        w.writerow([r.optimizer, _cell(r.lr), 0, "", _cell(v0), _cell(d0)])
        for i, loss in enumerate(r.train_loss):
            v, d = evals.get(i + 1, (None, None))
            w.writerow([r.optimizer, _cell(r.lr), i + 1, _cell(loss), _cell(v), _cell(d)])
    write_atomic(out / "curves.csv", buf.getvalue())
