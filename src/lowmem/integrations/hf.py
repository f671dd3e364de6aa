"""Capture the SNR of Adam's `v` inside a Hugging Face `Trainer` run.

    from lowmem.integrations.hf import LowmemCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[LowmemCallback(every=10, out="snr.csv")])
    trainer.train()
    plan = lowmem.build_plan(model, lowmem.SnrTrajectory.read("snr.csv"))

    # then train with the plan's optimizer:
    from lowmem.integrations.hf import optimizer_cls_and_kwargs
    trainer = Trainer(model, args, train_dataset=..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, plan, args))

A thin adapter over `lowmem.capture`: at ``on_train_begin`` it unwraps the optimizer from
accelerate's ``AcceleratedOptimizer`` and the model from its DDP / ``torch.compile`` wrappers and
attaches an `SnrCapture`; at ``on_train_end`` it closes it (the CSV is then in place). Under DDP
only the main process captures (`v` is replicated, so one rank's `v` is the whole of it); under
FSDP2 every process does, since the measurement is collective, and the main process writes.
Needs ``pip install lowmem[hf]`` (transformers, accelerate).
"""

from __future__ import annotations

from transformers import TrainerCallback

from lowmem.integrations import CaptureCallback


class LowmemCallback(CaptureCallback, TrainerCallback):
    """Attach `lowmem.capture` to a `Trainer`'s optimizer for the whole run; its arguments are
    `lowmem.integrations.CaptureCallback`'s (every, out, shadow, precision_out, precision_every,
    stream)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.start(optimizer, model, state.is_world_process_zero)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()


def optimizer_cls_and_kwargs(model, plan="lowmem-out/plan.json", args=None, *, lr: float | None = None,
                             weight_decay: float | None = None, betas: tuple[float, float] | None = None,
                             eps: float | None = None, **options) -> tuple[type, dict]:
    """What ``Trainer(optimizer_cls_and_kwargs=...)`` takes to train with a plan's optimizer:

        trainer = Trainer(model=model, args=args, train_dataset=...,
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "lowmem-out/plan.json", args))

    Args:
        model: the model the Trainer trains (the one the plan was made for).
        plan: a `Plan`, a ``plan.json`` path (SlimAdam with that plan), or a registry name
            (``"eve"``, ``"adam-mini"``, ``"adamem"``, …: that optimizer with its own preset).
        args: the Trainer's ``TrainingArguments``: its ``learning_rate``, ``weight_decay``,
            ``adam_beta1``/``adam_beta2`` and ``adam_epsilon`` are used (as the Trainer's AdamW
            would); the keyword arguments below override them.
        lr, weight_decay, betas, eps: the optimizer's settings (default: `args`'s, else the class's).
        options: more keyword arguments for the optimizer (``state_format="m=int8"``, ...).

    Weight decay goes where the Trainer puts it: not on biases and norms
    (``Trainer.get_decay_parameter_names``), through the optimizer's ``param_groups``. The
    Trainer builds the optimizer as ``cls(model, **kwargs)`` (transformers passes ``model`` from
    the kwargs in place of its parameter groups), so lowmem's optimizers, which take the model,
    see its names and roles.

    Raises:
        ValueError: an unknown optimizer name; FileNotFoundError: no plan file at `plan`.
    """
    import torch
    from transformers import Trainer

    from lowmem.compress import Plan
    from lowmem.compress.optim.presets import SlimAdam
    from lowmem.compress.optim.registry import REGISTRY, entry

    settings = {}
    if args is not None:
        settings = {"lr": args.learning_rate, "weight_decay": args.weight_decay,
                    "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    given = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
    settings.update({k: v for k, v in given.items() if v is not None})
    if isinstance(plan, str) and plan in REGISTRY:
        e = entry(plan)
        if e.cls is torch.optim.AdamW:
            raise ValueError("optimizer 'adamw' is the Trainer's own: use optim='adamw_torch' in TrainingArguments")
        cls, kwargs = e.cls, e.entry_kwargs(model)
        if e.hparams is not REGISTRY["adamw"].hparams and "betas" in settings:   # Adafactor: beta1 alone
            settings["beta1"] = settings.pop("betas")[0]
            settings.pop("eps", None)
    else:
        cls, kwargs = SlimAdam, {"plan": plan if isinstance(plan, Plan) else Plan.load(plan)}
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay]},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return cls, {"model": model, **kwargs, **settings, **options, "param_groups": [g for g in groups if g["params"]]}
