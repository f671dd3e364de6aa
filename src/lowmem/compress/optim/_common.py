"""Pieces every lowmem optimizer shares: eager argument checks, the model's named parameters,
state dtypes, and the checks a gradient must pass before a step.

Follows torch.optim's conventions (torch/optim/adamw.py): arguments are refused when the
optimizer is built, with the offending value in the message.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lowmem.layers import is_sharded, normalize_name
from lowmem.sharding import RowShards, row_shards


def check_hparams(lr: Any, betas: Any = None, eps: Any = None, weight_decay: Any = None) -> None:
    """Refuse out-of-range hyper-parameters eagerly, naming the value (as torch.optim does).

    Raises:
        ValueError: ``lr`` < 0 or not finite, a beta outside [0, 1), ``eps`` < 0,
            ``weight_decay`` < 0, or a tensor ``lr`` with more than one element.
    """
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
        lr_value = float(lr.detach().cpu())
    else:
        lr_value = lr
    if not isinstance(lr_value, (int, float)) or not math.isfinite(lr_value) or lr_value < 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if eps is not None and (not isinstance(eps, (int, float)) or not eps >= 0.0 or not math.isfinite(eps)):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if weight_decay is not None and (not isinstance(weight_decay, (int, float))
                                     or not weight_decay >= 0.0 or not math.isfinite(weight_decay)):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def as_float(lr: float | torch.Tensor) -> float:
    """A learning rate as a Python number (a 1-element tensor lr is read at each step)."""
    return float(lr.detach().cpu()) if isinstance(lr, torch.Tensor) else float(lr)


def state_dtype_for(param: torch.Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """fp32 states for low-precision parameters, fp64 for fp64 ones, unless told otherwise."""
    if state_dtype is not None:
        return state_dtype
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def check_grad(grad: torch.Tensor, name: str, optimizer: str) -> None:
    """Refuse gradients the optimizer cannot use, naming the parameter."""
    if grad.is_sparse:
        raise RuntimeError(f"{optimizer} does not support sparse gradients (parameter {name!r}); "
                           "use a dense embedding (sparse=False) or torch.optim.SparseAdam for it")
    if torch.is_complex(grad):
        raise RuntimeError(f"{optimizer} does not support complex parameters or gradients (parameter {name!r})")


def named_trainable(model: nn.Module) -> dict[int, str]:
    """``id(param) -> canonical name`` for every trainable parameter (tied weights once)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in names:
            names[id(p)] = normalize_name(name)
    return names


def row_sharding(model: nn.Module) -> dict[torch.Tensor, RowShards]:
    """``{param: RowShards}`` for each row-sharded (FSDP2) trainable parameter
    (`lowmem.sharding.row_shards`, which refuses other layouts by name)."""
    return {p: row_shards(p, name) for name, p in ((normalize_name(n), p) for n, p in model.named_parameters())
            if p.requires_grad and is_sharded(p)}


def rows_state(rows: torch.Tensor, p: torch.Tensor, dim: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A state that holds this rank's rows of row-sharded `p` along its `dim` (of global `shape`),
    as a DTensor sharded there, so `torch.distributed.checkpoint` saves every rank's part.
    Computations use its local tensor (`local`)."""
    from torch.distributed.tensor import DTensor, Shard

    placements = [Shard(dim) if not pl.is_replicate() else pl for pl in p.placements]
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(rows, p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather) for a DTensor; `t` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage); `t` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def param_groups_for(model: nn.Module, param_groups: Iterable | None) -> list[dict]:
    """The optimizer's groups: every trainable parameter of `model` in one group, or the
    torch-style ``param_groups`` given (a list of parameters or of dicts with ``"params"``),
    whose parameters must all belong to `model`.

    Raises:
        ValueError: a group holds a parameter that is not a trainable parameter of `model`.
    """
    names = named_trainable(model)
    if param_groups is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) in names]}]
    groups = list(param_groups)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or "params" not in g:
            raise ValueError(f"param group {i} must be a dict with a 'params' entry, got {type(g).__name__}")
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        for p in ps:
            if id(p) not in names:
                raise ValueError(f"param group {i} holds a tensor of shape {tuple(p.shape)} that is not a "
                                 "trainable parameter of the model the optimizer was built for")
        out.append({**g, "params": ps})
    return out


# What a loaded parameter state must hold: ``{key: accepted shapes}`` of the required keys and of
# the optional ones (checked only when present); ``step`` is always required.
StateSpec = tuple[dict[str, tuple[tuple[int, ...], ...]], dict[str, tuple[tuple[int, ...], ...]]]


def check_state_dict(optimizer: torch.optim.Optimizer, state_dict: Any, *, group_keys: tuple[str, ...],
                     check_group: Callable[[dict], None], spec: Callable[[torch.Tensor, dict], StateSpec],
                     names: dict[torch.Tensor, str], accepts: str,
                     before_states: Callable[[dict], None] | None = None) -> None:
    """Refuse, before anything is loaded, a checkpoint this optimizer could not step from, naming
    the entry and what was expected and found; a checkpoint that passes loads as torch would.

    Args:
        optimizer: the optimizer loading; its groups give the expected sizes.
        state_dict: what was passed to ``load_state_dict``.
        group_keys: hyper-parameters every saved param group must hold (another optimizer's
            checkpoint lacks some, e.g. an SGD one has no ``betas``).
        check_group: raises ValueError for an out-of-range hyper-parameter of a saved group.
        spec: ``(param, saved group) -> StateSpec``, what the param's saved state must hold.
        names: ``param -> name`` for the messages.
        accepts: which checkpoints load, for the messages (e.g. "its own or torch.optim.AdamW's").
        before_states: a check of the whole dict to run once its groups passed and before the
            states are checked (a plan optimizer's plan check, which says why shapes differ).

    Raises:
        TypeError: `state_dict` is not a dict.
        ValueError: an entry is missing, of the wrong type or shape, a count differs, or a
            hyper-parameter is out of range.
    """
    who = f"{type(optimizer).__name__}.load_state_dict"
    entries = _saved_entries(optimizer, state_dict, who, group_keys, check_group, accepts)
    if before_states is not None:
        before_states(state_dict)
    for index, (p, pid, group) in enumerate(entries):
        st = state_dict["state"].get(pid)
        what = f"{who}: parameter {names.get(p, '?')!r} (index {index})"
        if st is None:
            continue
        if not isinstance(st, dict):
            raise ValueError(f"{what}: its state is a {type(st).__name__}, expected a dict")
        if not st:
            continue
        required, optional = spec(p, group)
        lacks = [k for k in ("step", *required) if k not in st]
        if lacks:
            raise ValueError(f"{what}: its state lacks {', '.join(map(repr, lacks))} (it has {_keys(st)}): "
                             f"another optimizer's checkpoint? This one loads {accepts}")
        _check_step(st["step"], f"{what}: 'step'")
        for key, shapes in {**optional, **required}.items():
            if key in st:
                _check_tensor(st[key], shapes, f"{what}: {key!r}")


def _saved_entries(optimizer: torch.optim.Optimizer, state_dict: Any, who: str, group_keys: tuple[str, ...],
                   check_group: Callable[[dict], None], accepts: str) -> list[tuple[torch.Tensor, Any, dict]]:
    """`check_state_dict`'s checks of the dict and its groups; ``(param, its id in the
    checkpoint, the group it will step with)`` for every parameter of the optimizer."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{who} expects the dict that state_dict() returns ({accepts}), "
                        f"got {type(state_dict).__name__}")
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        raise ValueError(f"{who}: the checkpoint has no {' or '.join(map(repr, missing))} entry (its keys: "
                         f"{_keys(state_dict)}); expected the dict that state_dict() returns ({accepts})")
    saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(saved_state, dict):
        raise ValueError(f"{who}: the checkpoint's 'state' is a {type(saved_state).__name__}, expected a dict")
    if not isinstance(saved_groups, (list, tuple)):
        raise ValueError(f"{who}: the checkpoint's 'param_groups' is a {type(saved_groups).__name__}, "
                         "expected a list")
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"{who}: the checkpoint has {len(saved_groups)} param groups, this optimizer "
                         f"{len(groups)}")
    entries = []
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"{who}: checkpoint param group {i} is not a dict with a 'params' list "
                             f"(found {type(saved).__name__})")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{who}: checkpoint param group {i} holds {len(saved['params'])} parameters, "
                             f"this optimizer's {len(group['params'])}: a checkpoint of another model?")
        lacks = [k for k in group_keys if k not in saved]
        if lacks:
            raise ValueError(f"{who}: checkpoint param group {i} lacks {', '.join(map(repr, lacks))} (it has "
                             f"{_keys(saved)}): another optimizer's checkpoint? This one loads {accepts}")
        merged = {**group, **saved}
        try:
            check_group(merged)
        except ValueError as e:
            raise ValueError(f"{who}: checkpoint param group {i}: {e}") from None
        for pid, p in zip(saved["params"], group["params"]):
            if not _hashable(pid):
                raise ValueError(f"{who}: checkpoint param group {i} lists {pid!r} as a parameter id, "
                                 "expected an int")
            entries.append((p, pid, merged))
    return entries


def _keys(d: dict) -> str:
    return ", ".join(repr(k) for k in d) or "none"


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _shape_text(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _check_step(step: Any, what: str) -> None:
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(f"{what} is a {step.dtype} tensor of shape {_shape_text(step.shape)}, "
                             "expected a number or a 1-element real tensor")
        value = float(step.detach().cpu().reshape(()))
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        value = float(step)
    else:
        raise ValueError(f"{what} is {step!r} ({type(step).__name__}), expected a number or a 1-element tensor")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} is {value}, expected a finite count >= 0")


def _check_tensor(value: Any, shapes: tuple[tuple[int, ...], ...], what: str) -> None:
    expected = " or ".join(_shape_text(s) for s in shapes)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what} is a {type(value).__name__}, expected a tensor of shape {expected}")
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{what} is a {value.dtype} tensor, expected a real one of shape {expected}")
    if tuple(value.shape) not in [tuple(s) for s in shapes]:
        raise ValueError(f"{what} has shape {_shape_text(value.shape)}, expected {expected}")


def step_tensor(step: Any) -> torch.Tensor:
    """A checkpoint's ``step`` (a tensor, or a number as older torch saved it) as the float32
    scalar tensor lowmem optimizers count in; a tensor keeps its device."""
    if isinstance(step, torch.Tensor):
        return step.detach().reshape(()).to(torch.float32, copy=True)
    return torch.tensor(float(step), dtype=torch.float32)


def load_state_in_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict,
                               dtype_of: Callable[[torch.Tensor], torch.dtype]) -> None:
    """`torch.optim.Optimizer.load_state_dict`, except that floating states take the optimizer's
    own state dtype ``dtype_of(param)`` (torch casts them to the parameter's: fp32 states of bf16
    parameters would become bf16; a bf16 torch checkpoint's states become fp32 here), ``step``
    becomes a float32 scalar tensor, and every tensor is copied onto the parameter's device, never
    shared with the dict loaded. Check the dict first (`check_state_dict`)."""
    saved = state_dict["state"]
    load_groups(optimizer, state_dict)
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in zip(ids, params):
        if saved.get(pid):
            optimizer.state[p] = {k: step_tensor(v) if k == "step" else _state_copy(v, p, dtype_of(p))
                                  for k, v in saved[pid].items()}


def load_groups(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load the checkpoint's param groups (hyper-parameters) as torch does, keeping this
    optimizer's value of an option the checkpoint lacks (an AdamW checkpoint has no
    ``compiled``; one from an older torch no ``maximize``) instead of dropping it."""
    before = [dict(g) for g in optimizer.param_groups]
    torch.optim.Optimizer.load_state_dict(optimizer, {**state_dict, "state": {}})
    for group, old in zip(optimizer.param_groups, before):
        for key, value in old.items():
            group.setdefault(key, value)


def _state_copy(v: Any, p: torch.Tensor, dtype: torch.dtype) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    return v.detach().to(device=p.device, dtype=dtype, copy=True)
