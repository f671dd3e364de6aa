"""Several optimizers over disjoint parameters, stepped as one: Muon for a model's hidden
matrices with AdamW for the rest, as Muon's documentation prescribes.

`Combined` is a `torch.optim.Optimizer` whose ``param_groups`` are its parts' own group dicts (a
learning-rate schedule that sets ``group["lr"]`` sets the part's), whose ``state`` is a read-only
view of every part's state (what `optimizer_state_bytes` and the checkpoint code read), and whose
``step()`` steps each part in turn. Its state dict holds each part's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lowmem.layers import resolve_layers

__all__ = ["Combined", "muon_with_adamw"]


class _States(Mapping):
    """The parts' ``state`` mappings seen as one (parameters are disjoint, so no key repeats)."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self._parts = parts

    def __getitem__(self, p):
        for o in self._parts:
            if p in o.state:
                return o.state[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator:
        for o in self._parts:
            yield from o.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._parts)


class Combined(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, stepped as one.

    Args:
        parts: the optimizers; no parameter may be in two.

    Raises:
        ValueError: no parts, or a parameter in two of them.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]):
        parts = list(parts)
        params = [p for o in parts for g in o.param_groups for p in g["params"]]
        if not parts or not params:
            raise ValueError("Combined needs at least one optimizer with parameters")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("Combined: a parameter is in two of the optimizers")
        super().__init__(params, {})
        self.parts = parts
        self.param_groups = [g for o in parts for g in o.param_groups]   # the parts' own dicts
        self.state = _States(parts)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.parts:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [o.state_dict() for o in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("parts")
        if not isinstance(parts, list) or len(parts) != len(self.parts):
            raise ValueError(f"a Combined state dict of {len(self.parts)} parts was expected")
        for o, sd in zip(self.parts, parts):
            o.load_state_dict(sd)

    def __repr__(self) -> str:
        inner = ", ".join(f"{type(o).__name__}({sum(len(g['params']) for g in o.param_groups)} tensors)"
                          for o in self.parts)
        return f"Combined({inner})"


# Roles Muon's documentation leaves to AdamW whatever their shape: embeddings, the output layer.
_ADAMW_ROLES = {"embedding", "lm_head", "norm", "bias", "router"}


def muon_with_adamw(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    weight_decay: float = 0.0, momentum: float = 0.95) -> Combined:
    """``torch.optim.Muon`` for the model's hidden matrices, ``torch.optim.AdamW`` for the rest.

    Muon takes the trainable 2-D weights that are not embeddings, the output layer (LM head,
    classifier) or a router (roles from `lowmem.layers.resolve_layers`); AdamW takes everything
    else (embeddings, output layer, norms, biases, convolutions, 1-D and 3-D tensors), as Muon's
    documentation says. Muon's learning rate is scaled as Moonshot's (``adjust_lr_fn=
    "match_rms_adamw"``: 0.2·√max(A, B)), so one learning rate and weight decay serve both, as a
    sweep over AdamW's rates needs (Liu et al., "Muon is Scalable for LLM Training", 2025).

    Raises:
        AttributeError: this torch has no ``torch.optim.Muon`` (added in torch 2.9).
    """
    layers = resolve_layers(model, warn=False)
    named = dict(model.named_parameters())
    muon, adamw = [], []
    for info in layers:
        p = named[info.name]
        if not p.requires_grad:
            continue
        (muon if p.dim() == 2 and info.role not in _ADAMW_ROLES and not info.is_bias else adamw).append(p)
    parts = []
    if muon:
        parts.append(torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      adjust_lr_fn="match_rms_adamw"))
    if adamw:
        parts.append(torch.optim.AdamW(adamw, lr=lr, betas=betas, weight_decay=weight_decay))
    return Combined(parts)
