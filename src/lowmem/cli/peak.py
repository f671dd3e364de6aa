"""Peak training memory of a model.py (or built-in example) per optimizer, for the commands that
show it: ``lowmem-analyze memory --peak`` and the decision table at the end of an analysis.

`peak_optimizers` names the candidates as ``compare`` names them (so a sweep's loss gaps find
their rows); `trace_task` traces one training step of the task for each of them on fake tensors
(`lowmem.compress.peak.peak_report`) and turns the trace's failures into messages that say
which of the user's calls or lines could not be traced.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from lowmem.cli.common import user_code
from lowmem.compare import OptimizerSpec
from lowmem.compress.formats import StateFormat
from lowmem.compress.optim.presets import SlimAdam
from lowmem.compress.optim.registry import PEERS, REGISTRY
from lowmem.compress.peak import DTYPES, FAKE_ERRORS, PeakReport, PeakTraceError, parse_size, peak_report
from lowmem.probe import DEFAULTS, TaskError, call_user, user_failure

__all__ = ["batch_size", "dtype_words", "peak_optimizers", "size_argument", "spec_name", "trace_guarded", "trace_task"]


def peak_optimizers(plan, formats) -> dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    """name -> ``make(model)`` for the peak rows: torch AdamW as it runs on a GPU by default
    (``foreach=True``), every other registry optimizer on its ``foreach`` backend (the plan
    optimizers once per state format), torch's Muon (with AdamW beside it), torchao's 8- and 4-bit
    and bitsandbytes' 8-bit AdamW where installed, and the plan; named as ``compare`` names them
    (``eve:int8``), so a sweep's loss gaps find their rows."""
    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=DEFAULTS["lr"], foreach=True)

    def lowmem(e, **kw):
        return lambda model: e.make(model, lr=DEFAULTS["lr"], **kw)

    out = {}
    for e in REGISTRY.values():
        if e.cls is torch.optim.AdamW:
            out[e.name] = adamw
        elif e.preset is None:
            out[e.name] = lowmem(e)
        else:
            for fmt in formats or (None,):
                out[spec_name(e.name, fmt)] = lowmem(e, backend="foreach", state_format=fmt)
    # What a user would otherwise pick: torch's Muon, and torchao's and bitsandbytes' 8-bit (and
    # torchao's 4-bit) AdamW where installed (their code maps are built on real tensors, before the
    # trace or with its fake mode unset, and a compiled step runs eagerly in it).
    for name in ("muon", "torchao-adamw8bit", "torchao-adamw4bit", "bnb-adamw8bit"):
        peer = PEERS[name]
        if peer.unavailable() is None:
            out[peer.name] = (lambda e: lambda model: e.build(model, DEFAULTS["lr"], (0.9, 0.999), 0.0))(peer)
    if plan is not None:
        for fmt in formats or (None,):
            out[spec_name("plan", fmt)] = (
                lambda f: lambda model: SlimAdam(model, plan=plan, lr=DEFAULTS["lr"], backend="foreach", state_format=f))(fmt)
    return out


def spec_name(name: str, fmt) -> str:
    """`compare`'s spelling of an optimizer in a state format (fp32 state: the bare name)."""
    return name if fmt is None or fmt == StateFormat("fp32", "fp32") else str(OptimizerSpec(name, fmt))


RESIZED = "build_model() ran on the meta device and the batch was resized to --batch/--seq"


def trace_task(task, example: Any, optimizers: dict, how: str = RESIZED, **settings) -> PeakReport:
    """`peak_report` of `task` (a loaded model.py or example) from its batch `example`, with
    `settings` as `peak_report` takes them; the task's own functions run as user code; `how`
    says in a failure's message how the model and batch were made.

    Raises:
        TaskError: the user's build_model or loss_fn failed, or their step cannot be traced on
            fake tensors (the message names the call or line).
    """
    def build_model():
        return call_user(task, "build_model()", task.build_model)

    def loss_fn(model, batch):
        try:
            return task.loss_fn(model, batch)
        except FAKE_ERRORS:      # the trace's own: PeakTraceError says which op needed values
            raise
        except (Exception, SystemExit) as e:
            raise user_failure("loss_fn(model, batch)", task.source, e) from e

    return trace_guarded(task.source, lambda: peak_report(build_model, example, loss_fn, optimizers, **settings), how)


def trace_guarded(source: str, trace: Callable[[], PeakReport], how: str = RESIZED) -> PeakReport:
    """`trace()`, its failures as `TaskError` naming `source` and `how` it was traced (also a
    step that fails under fake tensors in a way lowmem cannot place, e.g. in a custom backward)."""
    where = f"(while tracing one training step of {source} on fake tensors for its peak memory: {how})"
    try:
        with user_code():
            return trace()
    except TaskError as e:
        raise TaskError(f"{e}\n{where}") from e
    except PeakTraceError as e:
        raise TaskError(f"{source}: {e}") from e
    except (Exception, SystemExit) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise TaskError(f"{source}: its training step cannot run on fake tensors ({type(e).__name__}: {first})\n"
                        f"{where}") from e


def size_argument(text: str) -> int:
    """An argparse type: a memory size such as ``24GiB`` or ``80GB`` in bytes (`parse_size`)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def batch_size(batch: Any) -> int | None:
    """Dimension 0 of the first tensor in `batch` (tuples, lists, dicts of them), None without one:
    the micro-batch size a model.py's own batch has."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for x in items:
        size = batch_size(x)
        if size is not None:
            return size
    return None


def dtype_words(model: torch.nn.Module) -> str:
    """The floating dtypes of `model`'s parameters as the peak tables name them: ``fp32``,
    ``bf16``, ``fp32+bf16`` (most parameters first), ``float64``."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    count: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    ordered = sorted(count, key=lambda d: -count[d])
    return "+".join(names.get(d, str(d).removeprefix("torch.")) for d in ordered) or "no floating"
