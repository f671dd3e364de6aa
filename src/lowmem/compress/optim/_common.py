"""Pieces every lowmem optimizer shares: eager argument checks, the model's named parameters,
state dtypes, and the checks a gradient must pass before a step.

Follows torch.optim's conventions (torch/optim/adamw.py): arguments are refused when the
optimizer is built, with the offending value in the message.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

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


def load_state_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """`torch.optim.Optimizer.load_state_dict`, except that state tensors keep their dtype (torch
    casts them to the parameter's: fp32 states of bf16 parameters would become bf16) and are
    copied onto the parameter's device, never shared with the dict loaded."""
    saved = state_dict["state"]
    torch.optim.Optimizer.load_state_dict(optimizer, {**state_dict, "state": {}})   # groups only
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in zip(ids, params):
        if pid in saved:
            optimizer.state[p] = {k: v.detach().clone() if k == "step" else v.detach().to(p.device, copy=True)
                                  if isinstance(v, torch.Tensor) else v for k, v in saved[pid].items()}
