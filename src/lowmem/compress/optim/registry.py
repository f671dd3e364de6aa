"""Every optimizer lowmem knows, in one place: its one name, how to build it, its preset plan,
its state size from shapes, and its paper.

`compare` (``--optimizers``), ``lowmem-analyze memory`` (its rows), ``--preset`` (the plan
presets), the README's optimizer table (`markdown_table`, checked by a test) and the optimizer
test battery all read `REGISTRY`. Adding an optimizer is one `OptimizerEntry` here (and its
class); a `v`-averaging one needs only a preset in `lowmem.compress.builders` and an entry whose
class is `ReducedAdamW` (a class of its own, as Eve's, only gives it an importable name).

`PEERS` lists optimizers of other packages (torchao, bitsandbytes) that `compare` can train
beside lowmem's as baselines. Their packages are optional, so an entry imports its class only
when built (`PeerEntry.unavailable` says why it cannot be), and their state is only ever
measured from the live optimizer: they have no shape-only count and no rows in ``memory``. The
README lists them in a second table (`peer_markdown_table`, checked by a test).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lowmem.compress.builders import PRESETS, build_preset
from lowmem.compress.optim.adamem import AdafactorMomentum, AdaMeM, adafactor_state_numel, adamem_state_numel
from lowmem.compress.optim.engine import ReducedAdamW
from lowmem.compress.optim.presets import AdaLayer, AdamMini, Eve, SlimAdam
from lowmem.compress.plan import Plan
from lowmem.layers import ModelLayers


@dataclass(frozen=True)
class StateCount:
    """Entries of one optimizer's state for one model: `m`, `v` (None where a method does not
    keep them apart) and all of it, step counters excluded."""

    m: int | None
    v: int | None
    total: int

    @classmethod
    def of(cls, m: int, v: int) -> "StateCount":
        return cls(m, v, m + v)


def adamw_count(model: nn.Module, layers: ModelLayers) -> StateCount:
    """AdamW: `m` and `v` for every entry of every trainable parameter (tied weights once)."""
    n = sum(info.numel for info in layers)
    return StateCount.of(n, n)


def plan_count(plan: Plan, layers: ModelLayers) -> StateCount:
    """A plan optimizer: full `m`, and `v` averaged over each parameter's reduce dims."""
    return StateCount.of(sum(info.numel for info in layers), sum(plan.layers[info.name].v_kept for info in layers))


def _preset_count(preset: str) -> Callable[[nn.Module, ModelLayers], StateCount]:
    return lambda model, layers: plan_count(build_preset(preset, model, layers), layers)


def _adafactor_momentum_count(model: nn.Module, layers: ModelLayers) -> StateCount:
    """Adafactor's factored statistics as `v`, and a full momentum `m`."""
    v = adafactor_state_numel(model, momentum=False)
    return StateCount.of(adafactor_state_numel(model, momentum=True) - v, v)


def _adam_hparams(lr: float, betas: tuple[float, float], weight_decay: float) -> dict:
    return dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer lowmem can build.

    Attributes:
        name: its one spelling (compare's ``--optimizers``, memory's rows, the test battery).
        cls: the optimizer class; lowmem's take the model first, torch's its parameters.
            `ReducedAdamW` itself: the plan engine with `preset`'s plan (no class needed).
        fixed: keyword arguments that make this entry of its class (e.g. ``variant="paper"``).
        keeps: what it keeps of Adam's state, in a few words (the README table).
        paper: where the method comes from (authors, title, year).
        preset: the preset plan (`lowmem.compress.builders.PRESETS`) its `v` follows, or None.
        count: state entries from shapes alone (a model on the meta device works).
        hparams: ``(lr, betas, weight_decay) -> keyword arguments``: the common settings in this
            optimizer's own terms (Adafactor takes β1 only).
    """

    name: str
    cls: type
    keeps: str
    paper: str
    count: Callable[[nn.Module, ModelLayers], StateCount]
    preset: str | None = None
    fixed: dict = field(default_factory=dict)
    hparams: Callable[[float, tuple[float, float], float], dict] = _adam_hparams

    @property
    def takes_model(self) -> bool:
        return self.cls is not torch.optim.AdamW

    def entry_kwargs(self, model: nn.Module) -> dict:
        """The keyword arguments that make this entry of its class for `model`: `fixed`, and for
        an entry of `ReducedAdamW` itself its preset's plan (so a `v`-averaging optimizer needs no
        class of its own). Every builder of an entry's optimizer (`make`, the Hugging Face
        integration) takes them from here."""
        if self.cls is ReducedAdamW:
            return {"plan": build_preset(self.preset, model), **self.fixed}
        return dict(self.fixed)

    def make(self, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
        """The optimizer for `model`, with `kwargs` as its class takes them."""
        target = model if self.takes_model else model.parameters()
        return self.cls(target, **self.entry_kwargs(model), **kwargs)

    def build(self, model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              weight_decay: float = 0.0, plan: Plan | None = None) -> torch.optim.Optimizer:
        """The optimizer for `model` from the settings every optimizer shares (`compare`'s);
        `plan` replaces the preset of an entry that takes one (SlimAdam)."""
        kwargs = self.hparams(lr, betas, weight_decay)
        if plan is not None:
            if self.cls is not SlimAdam:
                raise ValueError(f"optimizer {self.name!r} does not take a plan")
            kwargs["plan"] = plan
        return self.make(model, **kwargs)


REGISTRY: dict[str, OptimizerEntry] = {e.name: e for e in (
    OptimizerEntry("adamw", torch.optim.AdamW, "full m and v (the reference)",
                   "Loshchilov & Hutter, Decoupled Weight Decay Regularization (2019)", adamw_count),
    OptimizerEntry("slimadam", SlimAdam, "v averaged per the SNR plan or the published rules",
                   "Kalra, Kirchenbauer, Barkeshli, Goldstein, When Can You Get Away with Low Memory Adam? (2025)",
                   _preset_count("slimadam-rules"), preset="slimadam-rules"),
    OptimizerEntry("eve", Eve, "one v per output row of every matrix",
                   "Tomar et al., Eve: Less Memory, Same Might (2024)", _preset_count("eve"), preset="eve"),
    OptimizerEntry("adam-mini", AdamMini, "one v per Hessian block, as the adam-mini 1.1.1 package",
                   "Zhang et al., Adam-mini: Use Fewer Learning Rates To Gain More (2024)",
                   _preset_count("adam-mini"), preset="adam-mini"),
    OptimizerEntry("adam-mini-paper", AdamMini, "one v per Hessian block, as the paper's Algorithms 1-4",
                   "Zhang et al., Adam-mini: Use Fewer Learning Rates To Gain More (2024)",
                   _preset_count("adam-mini-paper"), preset="adam-mini-paper", fixed={"variant": "paper"}),
    OptimizerEntry("adalayer", AdaLayer, "one v per tensor; LM head and norms full",
                   "Zhao et al., Deconstructing What Makes a Good Optimizer for Language Models (2024)",
                   _preset_count("adalayer"), preset="adalayer"),
    OptimizerEntry("adamem", AdaMeM, "momentum in a top-r gradient subspace, Adafactor statistics",
                   "Vyas, Morwani, Kakade, AdaMeM: Memory Efficient Momentum for Adafactor (2024)",
                   lambda model, layers: StateCount(None, None, adamem_state_numel(model))),
    OptimizerEntry("adafactor-momentum", AdafactorMomentum, "Adafactor statistics plus full momentum",
                   "Shazeer & Stern, Adafactor (2018), with momentum as the AdaMeM paper's baseline",
                   _adafactor_momentum_count,
                   hparams=lambda lr, betas, weight_decay: dict(lr=lr, beta1=betas[0], weight_decay=weight_decay)),
)}

NAMES: tuple[str, ...] = tuple(REGISTRY)
PLAN_PRESETS: tuple[str, ...] = tuple(e.preset for e in REGISTRY.values() if e.preset is not None)
assert set(PLAN_PRESETS) == set(PRESETS), "every preset plan belongs to one registry entry"


def entry(name: str) -> OptimizerEntry:
    """The registry entry `name`.

    Raises:
        ValueError: no such optimizer (the known names are in the message).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(NAMES)}") from None


class PeerUnavailable(RuntimeError):
    """A peer optimizer's package is not installed (or does not import here)."""


@dataclass(frozen=True)
class PeerEntry:
    """An optimizer from another package that `compare` can run as a baseline.

    Attributes:
        name: its one spelling (compare's ``--optimizers``).
        module, attr: where its class lives (``torchao.optim``, ``AdamW8bit``), imported on use.
        requirement: what to install for it (``pip install REQUIREMENT``).
        keeps: what it keeps of Adam's state, in a few words (the README table).
        paper: where the method comes from (authors, title, year).
        fixed: keyword arguments that make this entry of its class.
        hparams: ``(lr, betas, weight_decay) -> keyword arguments``, as `OptimizerEntry.hparams`.
        make: ``(model, lr, betas, weight_decay) -> optimizer`` where the class is not simply
            built over every trainable parameter (Muon: AdamW for what Muon does not take).
    """

    name: str
    module: str
    attr: str
    requirement: str
    keeps: str
    paper: str
    fixed: dict = field(default_factory=dict)
    hparams: Callable[[float, tuple[float, float], float], dict] = _adam_hparams
    make: Callable[..., torch.optim.Optimizer] | None = None

    def unavailable(self) -> str | None:
        """Why this peer cannot be built here (its package is missing or fails to import), or None."""
        try:
            self.load()
        except PeerUnavailable as e:
            return str(e)
        return None

    def load(self) -> type:
        """The optimizer class.

        Raises:
            PeerUnavailable: its package is missing or fails to import (the message says what to install).
        """
        import importlib
        import logging
        import warnings

        # On import, torchao logs the CUDA kernels a CPU build lacks (and makes torch log its pytree
        # registrations), bitsandbytes the kernels it could not fetch: not the user's concern, and
        # `-q` promises an empty stderr.
        loggers = [logging.getLogger(n) for n in ("torchao", "bitsandbytes", "torch.utils._pytree")]
        levels = [lg.level for lg in loggers]
        try:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            # real tensors even when first imported inside a peak trace: a package's module-level
            # tables (bitsandbytes' code maps) made fake there would stay fake for the process
            with warnings.catch_warnings(), unset_fake_temporarily():   # torchao warns on import about
                warnings.simplefilter("ignore")                        # kernels a CPU build lacks
                module = importlib.import_module(self.module)
        except Exception as e:   # a broken install raises more than ImportError (OSError, RuntimeError)
            raise PeerUnavailable(f"optimizer {self.name!r} needs {self.requirement.split('=')[0]}, which does not "
                                  f"import here ({type(e).__name__}: {e}); pip install '{self.requirement}'") from None
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
        cls = getattr(module, self.attr, None)
        if cls is None:
            raise PeerUnavailable(f"optimizer {self.name!r}: {self.module} has no {self.attr} in this version; "
                                  f"pip install '{self.requirement}'")
        return cls

    def build(self, model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              weight_decay: float = 0.0, plan: Plan | None = None) -> torch.optim.Optimizer:
        """The optimizer over `model`'s trainable parameters from the settings every optimizer shares.

        Raises:
            PeerUnavailable: its package is missing; ValueError: a plan was given (peers take none).
        """
        if plan is not None:
            raise ValueError(f"optimizer {self.name!r} does not take a plan")
        cls = self.load()
        if self.make is not None:
            return self.make(model, lr, tuple(betas), weight_decay)
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(params, **self.fixed, **self.hparams(lr, betas, weight_decay))


PEERS: dict[str, PeerEntry] = {e.name: e for e in (
    PeerEntry("torchao-adamw8bit", "torchao.optim", "AdamW8bit", "torchao==0.18.0",
              "m and v as 8-bit codes, one fp32 scale per 256 entries",
              "Dettmers, Lewis, Shleifer, Zettlemoyer, 8-bit Optimizers via Block-wise Quantization (2022)"),
    PeerEntry("torchao-adamw4bit", "torchao.optim", "AdamW4bit", "torchao==0.18.0",
              "m and v as 4-bit codes (v on a linear map), one fp32 scale per 128 entries",
              "Li, Chen, Zhu, Memory Efficient Optimizers with 4-bit States (2023)"),
    PeerEntry("bnb-adamw8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes==0.50.2",
              "m and v as 8-bit codes, one fp32 scale per 256 entries",
              "Dettmers, Lewis, Shleifer, Zettlemoyer, 8-bit Optimizers via Block-wise Quantization (2022)"),
    PeerEntry("muon", "torch.optim", "Muon", "torch>=2.9",
              "one momentum buffer for hidden matrices (orthogonalised updates); AdamW's m and v for the rest",
              "Jordan et al., Muon (2024); Liu et al., Muon is Scalable for LLM Training (2025)",
              make=lambda model, lr, betas, weight_decay: _muon(model, lr, betas, weight_decay)),
)}


def _muon(model, lr, betas, weight_decay):
    from lowmem.compress.optim.combined import muon_with_adamw

    return muon_with_adamw(model, lr, betas, weight_decay)

PEER_NAMES: tuple[str, ...] = tuple(PEERS)
assert not set(PEER_NAMES) & set(NAMES), "a peer's name is not a lowmem optimizer's"


def peer_markdown_table() -> str:
    """The README's table of peer optimizers (other packages' baselines for `compare`)."""
    rows = ["| name | class | keeps | install | paper |", "|---|---|---|---|---|"]
    for e in PEERS.values():
        cls = f"{e.module}.{e.attr}"
        rows.append(f"| `{e.name}` | `{cls}` | {e.keeps} | `{e.requirement}` | {e.paper} |")
    return "\n".join(rows)


def markdown_table() -> str:
    """The README's table of optimizers, one row per entry."""
    rows = ["| name | class | keeps | preset plan | paper |", "|---|---|---|---|---|"]
    for e in REGISTRY.values():
        cls = e.cls.__name__ if e.takes_model else f"torch.optim.{e.cls.__name__}"
        if e.fixed:
            cls += "(" + ", ".join(f"{k}={v!r}" for k, v in e.fixed.items()) + ")"
        rows.append(f"| `{e.name}` | `{cls}` | {e.keeps} | {'`' + e.preset + '`' if e.preset else '-'} | {e.paper} |")
    return "\n".join(rows)

