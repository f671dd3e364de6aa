"""Peak training memory of one step, traced on fake tensors: weights, gradients, optimizer
state, activations and temporaries at the peak, and the largest micro-batch under a budget.

State bytes are only part of what decides whether a run fits. This module runs one real training
step (forward, backward, ``optimizer.step()``, ``zero_grad()``) of the user's own model, loss and
optimizer, but on fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`: every op computes
shapes and dtypes, no values and no memory), and records what is live with PyTorch's own
`torch.distributed._tools.mem_tracker.MemTracker`, which sorts every tensor it sees into
parameters, buffers, gradients, activations, temporaries and optimizer state. So any model that
runs under ``FakeTensorMode`` is measured by what it actually allocates, not by a formula, and a
70B model costs the machine a few hundred MB of Python objects.

How the step is traced (`trace_peak`):
- the model is built with its parameters on the meta device (no initialisation work), cast there
  to the parameter dtype (or left as built), optionally wrapped for activation checkpointing, then
  given fake CPU storage (`_fake`); the batch is made of fake tensors of the asked shapes
  (`resized_batch`);
- two steps run: the first creates the optimizer's state, the second runs with it; the peak is
  over both;
- the optimizer's state is read from the optimizer after the steps, and what the tracker counted
  as optimizer memory at the peak beyond it (the step's own temporaries) is counted with the
  temporaries; the batch, made before the trace, is added as ``inputs``.
For many optimizers and batch sizes (`peak_report`, `largest_batch`) the step is traced in two
parts that `combine` exactly: the forward and backward alone (once per batch size, shared by every
optimizer; `trace_forward_backward`) and the optimizer's step alone (once per optimizer;
`trace_optimizer_step`). A steady-state step peaks either in its backward, with the state live,
or in its optimizer step, with the batch live; the tests check the combination against
`trace_peak` and `trace_peak` against the measured peak of real steps.

What the figures are, and are not:
- tensor bytes allocated at the peak (``torch.cuda.max_memory_allocated``'s kind of number), not
  reserved: the caching allocator's rounding and fragmentation, the CUDA context (about 0.3–1 GiB
  per process) and NCCL buffers come on top; leave headroom under a device's capacity;
- the trace runs on fake *CPU* tensors (torch's CPU build cannot run autograd on fake CUDA
  tensors), so the kernels chosen are the CPU ones (and `_cpu_meta_kernels` lets grouped matrix
  products, transformers 5's experts, run in fp32 as the CPU kernel does). Attention through
  ``scaled_dot_product_attention`` saves what the fused (flash) kernels save on both; torch's
  AdamW is built with ``foreach=True`` (its default on CUDA, with one parameter-sized temporary
  per step); lowmem's optimizers step on their ``foreach`` backend (the Triton kernels on a GPU
  keep no temporaries, so their real peak is at most this); a step that compiles its kernels
  (torchao's 8- and 4-bit AdamW) runs eagerly in the trace (`_eager_compile`): the same state,
  and the eager ops' temporaries, an upper bound on the compiled kernel's; code maps that a
  package computes from tensor values (torchao's, bitsandbytes') are made on real tensors
  (`_peer_maps`, `_make_optimizer`);
- the step is the one your code runs: a model that synchronises with the host or branches on
  values (``.item()``, ``nonzero``, data-dependent shapes) cannot be traced and raises
  `PeakTraceError` naming the op.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

# A step that compares data pointers (lowmem's state formats skip a copy onto itself) reads fake
# ones, which costs no memory either way; torch's deprecation warning about it is noise here.
warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor", category=UserWarning)

__all__ = ["PeakMemory", "PeakTraceError", "combine", "largest_batch", "resized_batch", "trace_forward_backward",
           "trace_optimizer_step", "trace_peak"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a fake tensor raises where an op needs values it does not have.
FAKE_ERRORS = (DataDependentOutputException, DynamicOutputShapeException)


class PeakTraceError(RuntimeError):
    """The training step could not be traced on fake tensors (the message says which op or call)."""


@dataclass(frozen=True)
class PeakMemory:
    """Bytes live at the peak of one training step, by kind, and the peak itself.

    Attributes:
        weights: parameters (tied ones once), in the parameter dtype.
        buffers: the model's buffers.
        gradients: gradients live at the peak (at a backward peak, those computed so far).
        state: the optimizer's state after the step, step counters included.
        activations: tensors the forward saved for the backward, live at the peak.
        temporaries: everything else live at the peak: the backward's and the optimizer step's
            own work tensors.
        inputs: the batch (live through the whole step).
        peak: their sum, the most live at any moment of the step.
        batch: the micro-batch size traced (None: the model's own batch).
        seq: the sequence length traced (None: the model's own).
    """

    weights: int
    buffers: int
    gradients: int
    state: int
    activations: int
    temporaries: int
    peak: int
    inputs: int = 0
    batch: int | None = None
    seq: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "PeakMemory":
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})


def resized_batch(example: Any, batch: int | None = None, seq: int | None = None, device="cpu") -> Any:
    """`example` (a batch as ``get_batch`` returns it: a tensor, or tuples, lists and dicts of them)
    with every tensor replaced by an empty one of its dtype and the asked sizes: dimension 0 set to
    `batch` and, for tensors of two or more dimensions, dimension 1 set to `seq` (None: kept).
    Under ``FakeTensorMode`` the result is fake and holds no memory; values do not matter there
    (integer tensors are zeros, a valid token id)."""
    if isinstance(example, torch.Tensor):
        shape = list(example.shape)
        if batch is not None and shape:
            shape[0] = batch
        if seq is not None and len(shape) >= 2:
            shape[1] = seq
        return torch.zeros(shape, dtype=example.dtype, device=device)
    if isinstance(example, (tuple, list)):
        items = [resized_batch(x, batch, seq, device) for x in example]
        return type(example)(*items) if hasattr(example, "_fields") else type(example)(items)
    if isinstance(example, dict):
        return type(example)((k, resized_batch(v, batch, seq, device)) for k, v in example.items())
    return example


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of the model's longest ``nn.ModuleList`` (its transformer blocks): what
    activation checkpointing wraps, each block's inputs saved and its inside recomputed."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []


def _checkpointed(model: nn.Module) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    blocks = {id(b) for b in repeated_blocks(model)}
    if not blocks:
        raise PeakTraceError("activation checkpointing wraps the blocks of the model's longest nn.ModuleList, "
                             f"and {type(model).__name__} has none")
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in blocks)
    return model


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal language model's logits on its own input ids (the
    loss of the built-in configs, `lowmem.compress.configs`)."""
    logits = model(input_ids)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1))


@contextlib.contextmanager
def _explained(what: str):
    try:
        yield
    except FAKE_ERRORS as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename
                  and not (f.filename == __file__ and f.name == "__torch_dispatch__")]   # (`_cpu_meta_kernels`)
        where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
        raise PeakTraceError(f"{what} needs tensor values{where} ({e}), which a trace on fake tensors does not "
                             "have: peak memory can only be traced for a step without .item(), nonzero() or "
                             "value-dependent shapes") from e


def _prepare_quantization_maps() -> None:
    """Build the 8-/4-bit code maps and their encoders on real tensors before the trace (they are
    computed once per device from Python numbers, which fake tensors cannot give back; made under
    the trace they would be fake and cached so). A peer package's maps are made where its
    optimizer is (`_make_optimizer`)."""
    from lowmem.compress.formats import QUANTIZED
    from lowmem.compress.optim.quant import _encoder
    from lowmem.compress.optim.state import _qmap

    cpu = torch.device("cpu")
    for which in ("m", "v"):
        for fmt in QUANTIZED:
            _encoder(_qmap(which, fmt, cpu), cpu)


def _peer_maps() -> None:
    """torchao's code maps, where its optimizers are imported: cached per process from
    ``.tolist()`` of a tensor, so they are made on real tensors (call with no fake mode active)."""
    for module in ("torchao.optim.subclass_8bit", "torchao.optim.subclass_4bit"):
        maps = sys.modules.get(module)
        for name in ("get_qmap_signed", "get_qmap_unsigned"):
            if callable(getattr(maps, name, None)):
                getattr(maps, name)()


# Packages whose optimizers (`lowmem.compress.optim.registry.PEERS`) build code maps from tensor
# values: their constructors run with the fake mode unset (`_make_optimizer`).
_PEER_PACKAGES = ("bitsandbytes", "torchao")


def _make_optimizer(make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], model: nn.Module):
    """`make_optimizer(model)` under the trace's fake-tensor mode. Where the constructor of a peer
    package (bitsandbytes, torchao: `_PEER_PACKAGES`) needs tensor values (bitsandbytes builds its
    code maps there), it is made again with the mode unset, so that what it builds from Python
    numbers is real (its state, made in the step, is fake); any other constructor that needs values
    stays an error (made for real, it could allocate a real state the size of the model). The maps
    of a package it imported (torchao) are then made real too, before its first step."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        optimizer = make_optimizer(model)
    except FAKE_ERRORS as e:
        frames = traceback.extract_tb(e.__traceback__)
        if not any(f"{os.sep}{package}{os.sep}" in f.filename for f in frames for package in _PEER_PACKAGES):
            with _explained("making the optimizer"):
                raise
        with unset_fake_temporarily():
            optimizer = make_optimizer(model)
    with unset_fake_temporarily():
        _peer_maps()
    return optimizer


@contextlib.contextmanager
def _cpu_meta_kernels():
    """torch's meta kernel of ``aten._grouped_mm`` (what fake tensors run) accepts bf16 inputs only,
    the CUDA kernel's rule, while the CPU kernel, which transformers 5's mixture-of-experts layers
    call with fp32 parameters, takes fp32 too. While a step is traced (inside the fake-tensor mode,
    below the memory tracker), a dispatch mode of its own answers that op for fp32 and fp16
    operands: torch's checks of shapes and offsets (not its bf16 alignment of strides), then
    torch's output rule in the operands' dtype. Nothing global changes; other dtypes and ops go on
    to torch's kernels."""
    try:
        from torch._meta_registrations import _create_grouped_mm_output_tensor
        from torch.utils._python_dispatch import TorchDispatchMode
        op = torch.ops.aten._grouped_mm.default
    except (ImportError, AttributeError):   # a torch without them: its own meta kernel stands
        yield
        return

    def grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
        a2, b2 = mat_a.dim() == 2, mat_b.dim() == 2
        torch._check(mat_a.dim() in (2, 3) and mat_b.dim() in (2, 3), lambda: "Multiplicands must be 2D or 3D")
        torch._check(a2 and b2 or mat_a.size(-1) == mat_b.size(-2),
                     lambda: "contraction dimension of mat_a and mat_b must match")
        if a2 or b2:
            torch._check(offs is not None and offs.dim() == 1 and offs.dtype == torch.int32,
                         lambda: "a 2D multiplicand needs a 1D int32 offsets tensor")
        else:
            torch._check(offs is None, lambda: "Offsets tensor provided, but is not needed for 3D/3D")
        torch._check(bias is None, lambda: "Bias tensor provided, but it is not supported yet.")
        return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)

    class AnyFloat(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is op:
                bound = dict(zip(("mat_a", "mat_b", "offs", "bias", "out_dtype"), args), **kwargs)
                bound = {{"self": "mat_a", "mat2": "mat_b"}.get(k, k): v for k, v in bound.items()}
                a, b = bound["mat_a"], bound["mat_b"]
                if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float16) \
                        and bound.get("out_dtype") in (None, a.dtype):
                    return grouped_mm(**bound)
            return func(*args, **kwargs)

    with AnyFloat():
        yield


@contextlib.contextmanager
def _eager_compile():
    """``torch.compile`` as the identity while a step runs in the trace (not while the model and
    optimizer are made, so a package imported then compiles as it means to): a compiled step
    (torchao's 8- and 4-bit AdamW compile theirs with ``fullgraph=True``) runs its Python ops
    eagerly on the fake tensors, as dynamo cannot trace under a fake-tensor mode. Its state is the
    same; its temporaries are those of the eager ops, at least as many as a fused kernel's."""
    def identity(model=None, **kwargs):
        return model if model is not None else (lambda fn: fn)

    compile_ = torch.compile
    torch.compile = identity
    try:
        yield
    finally:
        torch.compile = compile_


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter and buffer a module registers goes to the meta device as it is registered
    (so initialisation then runs on meta tensors: no memory, no time), while every other tensor
    the code makes stays where it would be. Not ``with torch.device("meta")``: that would also
    put on meta whatever the user's code makes and keeps (a dataset cached on first use, as the
    built-in example's is), and a later real run would find it there."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def on_meta(t):
        return t if t is None or t.is_meta else t.to("meta")

    def parameter(module, name, param):
        register_parameter(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = type(p)(on_meta(p.data), requires_grad=p.requires_grad)

    def buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, on_meta(tensor), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def _meta_model(build_model: Callable[[], nn.Module], param_dtype: torch.dtype | None, checkpointing: bool) -> nn.Module:
    """The model built with its parameters on the meta device (`_parameters_on_meta`), cast (None:
    left in the dtypes it was built with) and wrapped for checkpointing there (outside ``FakeTensorMode``, which cannot swap a module's
    tensors); `_fake` gives it storage."""
    with _parameters_on_meta():
        model = build_model()
    if param_dtype is not None:
        model = model.to(param_dtype)
    return _checkpointed(model) if checkpointing else model


def _fake(model: nn.Module) -> nn.Module:
    """`model` (on the meta device) with fake CPU storage (call under ``FakeTensorMode``).

    Not ``model.to_empty()``: from meta to fake tensors it makes a new parameter per module, so a
    weight tied between two modules (an LM head and its token embedding) would become two, its
    weights, gradients and state counted twice. Here a tensor shared by several modules stays
    one."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in made:
                    new = torch.empty_like(t, device="cpu")
                    made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if wrap else new
                table[name] = made[id(t)]
    return model.train()


def _input_bytes(batch: Any) -> int:
    """Bytes of the tensors in `batch` (tuples, lists, dicts of them), counted as the tracker
    counts CPU tensors, unrounded (a batch is made before the trace starts, so the tracker does
    not see it)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, (tuple, list)):
        return sum(_input_bytes(x) for x in batch)
    if isinstance(batch, dict):
        return sum(_input_bytes(x) for x in batch.values())
    return 0


# What each kind of the trackers (MemTracker's `_MemRefType`, FSDPMemTracker's `_FSDPRefType`)
# counts as, by the kind's name.
_KINDS = {"PARAM": "weights", "SHARDED_PARAM": "weights", "UNSHARDED_PARAM": "weights", "BUFFER": "buffers",
          "GRAD": "gradients", "SHARDED_GRAD": "gradients", "UNSHARDED_GRAD": "gradients", "ACT": "activations",
          "OPT": "optimizer", "TEMP": "temporaries", "OTH": "temporaries", "ALL_GATHER": "temporaries",
          "REDUCE_SCATTER": "temporaries", "INP": "temporaries"}


def _by_kind(snapshot: dict) -> tuple[dict[str, int], int]:
    """({what: bytes} summed over devices, the total) of a tracker snapshot."""
    out = dict.fromkeys(("weights", "buffers", "gradients", "activations", "optimizer", "temporaries"), 0)
    total = 0
    for by_kind in snapshot.values():
        for kind, n in by_kind.items():
            name = getattr(kind, "name", None)
            if name in _KINDS:
                out[_KINDS[name]] += n
            elif kind == "Total":
                total += n
    return out, total


def _state_bytes(tracker) -> int:
    """The optimizer memory the tracker sees live now: after a step and ``zero_grad()``, the
    optimizer's state alone."""
    return _by_kind(tracker.get_tracker_snapshot())[0]["optimizer"]


def _snapshot(tracker, state: int = 0, inputs: int = 0) -> dict[str, int]:
    """Bytes by kind at the tracker's peak. The tracker counts as optimizer memory the state and
    whatever the step allocates: the state is what the optimizer holds after it (`state`), the
    rest were the step's temporaries. Under FSDP2, weights and gradients count both the rank's
    shards and the gathered copies live at the peak, and temporaries the all-gather and
    reduce-scatter buffers."""
    kinds, total = _by_kind(tracker.get_tracker_snapshot("peak"))
    opt = kinds.pop("optimizer")
    kept = min(state, opt)
    return dict(kinds, state=kept, temporaries=kinds["temporaries"] + opt - kept, inputs=inputs, peak=total + inputs)


@contextlib.contextmanager
def _fake_world(world: int):
    """A fake process group of `world` ranks and its device mesh (None for one rank): FSDP2
    shards as it would on `world` ranks, with no other process and no communication."""
    if world == 1:
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise PeakTraceError("per-rank figures (world > 1) trace on a fake process group, and this process "
                             "already has a process group: run it outside a distributed job")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def _shard(model: nn.Module, mesh) -> None:
    """FSDP2 as it is usually applied: each block of the longest ``nn.ModuleList``, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def trace_peak(build_model: Callable[[], nn.Module], make_batch: Callable[[], Any],
               loss_fn: Callable[[nn.Module, Any], torch.Tensor],
               make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], *,
               param_dtype: torch.dtype | None = torch.float32, autocast: torch.dtype | None = None,
               checkpointing: bool = False, world: int = 1) -> PeakMemory:
    """Trace two training steps on fake tensors and return what is live at their peak (the first
    step creates the optimizer's state, the second runs with it; the peak is over both).

    Args:
        build_model: makes the model (its parameters and buffers are put on the meta device as
            they are registered, `_parameters_on_meta`: no weights are made).
        make_batch: makes the batch (called under ``FakeTensorMode``; e.g. `resized_batch` of the
            model's own batch).
        loss_fn: ``loss_fn(model, batch) -> scalar`` (the ``model.py`` contract).
        make_optimizer: ``make_optimizer(model) -> optimizer`` over the fake model.
        param_dtype: the parameters' dtype (bf16: pure-bf16 training; None: as built).
        autocast: run forward and loss under ``torch.autocast`` in this dtype (mixed precision
            with parameters in `param_dtype`), or None.
        checkpointing: recompute each block of the longest ``nn.ModuleList`` in the backward
            (`repeated_blocks`) instead of keeping its activations.
        world: ranks of FSDP2 data parallelism: the figures of one rank, its model sharded as
            FSDP2 is usually applied (`fully_shard` on each block of the longest
            ``nn.ModuleList``, then the root), traced with PyTorch's ``FSDPMemTracker`` on a
            fake process group; `make_batch` makes one rank's micro-batch.

    Raises:
        PeakTraceError: the step needs tensor values, the model has no blocks to checkpoint, or
            (world > 1) this process is already in a process group.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    _prepare_quantization_maps()
    model = _meta_model(build_model, param_dtype, checkpointing)
    with _fake_world(world) as mesh, FakeTensorMode(allow_non_fake_inputs=True), _cpu_meta_kernels():
        model = _fake(model)
        if mesh is not None:
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

            _shard(model, mesh)
        optimizer = _make_optimizer(make_optimizer, model)
        batch = make_batch()
        if mesh is None:
            tracker = MemTracker()
            tracker.track_external(model, optimizer)
        else:
            tracker = FSDPMemTracker(model, optimizer)
        with tracker, _explained("the training step"), _eager_compile():
            for _ in range(2):
                tracker.reset_mod_stats()   # per-module figures only: the peak is kept over both steps
                _forward_backward(model, batch, loss_fn, autocast)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return PeakMemory(**_snapshot(tracker, _state_bytes(tracker), _input_bytes(batch)))


def _forward_backward(model, batch, loss_fn, autocast: torch.dtype | None) -> None:
    with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
        loss = loss_fn(model, batch)
    loss.backward()


def trace_forward_backward(build_model: Callable[[], nn.Module], make_batch: Callable[[], Any],
                           loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
                           param_dtype: torch.dtype | None = torch.float32, autocast: torch.dtype | None = None,
                           checkpointing: bool = False) -> PeakMemory:
    """The peak of one forward and backward alone (no optimizer; gradients None at the start, as
    after ``zero_grad()``): the part of a step that grows with the batch. `combine` adds an
    optimizer's `trace_optimizer_step` to it; arguments as `trace_peak`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    model = _meta_model(build_model, param_dtype, checkpointing)
    with FakeTensorMode(allow_non_fake_inputs=True), _cpu_meta_kernels():
        model = _fake(model)
        batch = make_batch()
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker, _explained("the forward and backward"), _eager_compile():
            _forward_backward(model, batch, loss_fn, autocast)
        return PeakMemory(**_snapshot(tracker, inputs=_input_bytes(batch)))


def trace_optimizer_step(build_model: Callable[[], nn.Module],
                         make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], *,
                         param_dtype: torch.dtype | None = torch.float32) -> PeakMemory:
    """The peak of two optimizer steps alone, over gradients of every trainable parameter (the
    first step creates the state): the part of a training step that does not depend on the batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    _prepare_quantization_maps()
    model = _meta_model(build_model, param_dtype, False)
    with FakeTensorMode(allow_non_fake_inputs=True), _cpu_meta_kernels():
        model = _fake(model)
        optimizer = _make_optimizer(make_optimizer, model)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker, _explained("the optimizer step"), _eager_compile():
            for _ in range(2):
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        snap = _snapshot(tracker, _state_bytes(tracker))
    # The gradients set here are made outside a backward, so the tracker files them as activations;
    # with no forward run, that is all its activations are.
    snap["gradients"], snap["activations"] = snap["gradients"] + snap["activations"], 0
    return PeakMemory(**snap)


def combine(forward_backward: PeakMemory, step: PeakMemory) -> PeakMemory:
    """The peak of training steps from their two parts, exactly as `trace_peak` would trace it:
    a steady-state step's forward and backward run with the optimizer's state live (so that
    phase peaks at `forward_backward`'s peak plus the state), its optimizer step peaks as
    `step` with the batch still live; the higher phase is the peak, with its own breakdown.
    (The first step's forward
    and backward, with no state yet, is lower than a later one's.)"""
    with_state = forward_backward.peak + step.state
    with_inputs = step.peak + forward_backward.inputs       # the batch stays live through the step
    if with_state >= with_inputs:
        return replace(forward_backward, state=step.state, peak=with_state)
    return replace(step, inputs=forward_backward.inputs, peak=with_inputs, batch=forward_backward.batch,
                   seq=forward_backward.seq)


def _rss() -> tuple[int, int]:
    """(resident set size now, its peak since the last reset) of this process, in bytes (Linux)."""
    now = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return now, peak


def measure_peak(build_model: Callable[[], nn.Module], make_batch: Callable[[], Any],
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], *,
                 device: str | torch.device = "cpu", param_dtype: torch.dtype = torch.float32,
                 autocast: torch.dtype | None = None, checkpointing: bool = False) -> int:
    """The measured peak of two real training steps, in bytes above what was live before the
    model was built: what `trace_peak` estimates, on real tensors (with `autocast` and
    `checkpointing` as `trace_peak` takes them).

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensor bytes, the allocator's 512-byte rounding
    included). On CPU (Linux): the process's peak resident set size (``VmHWM``, reset through
    ``/proc/self/clear_refs``) above its size before; it counts every page the step touched,
    the allocator's and the kernels' workspaces too, and is exact only where freed tensors go
    back to the system: run it in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` set low
    (e.g. 65536), so that glibc maps every tensor of that size or more on its own.
    """
    device = torch.device(device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss()[0]
    model = build_model().to(device=device, dtype=param_dtype).train()
    if checkpointing:
        model = _checkpointed(model)
    optimizer = make_optimizer(model)
    batch = make_batch()
    for _ in range(2):
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss = loss_fn(model, batch)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _rss()[1] - before


MAX_BATCH = 1 << 20   # where `largest_batch` stops looking: "at least this many"


def largest_batch(peak_at: Callable[[int], PeakMemory], budget: int, *,
                  limit: int = MAX_BATCH) -> tuple[int, PeakMemory | None]:
    """The largest micro-batch whose traced peak fits in `budget` bytes, and its figures
    ((0, None) where not even one sample fits; `limit` where even that fits).

    The peak grows with the batch (activations and temporaries linearly, the rest not at all), so
    the search doubles the batch from 1 until it no longer fits (batches 1, 2, 4, ... : the same
    for every optimizer, so a caller that caches `peak_at` shares them), then narrows the last
    interval by interpolation, checking the neighbour of each guess (a straight line lands on the
    answer in one or two traces), alternating with halving so that a peak that is not straight
    still takes no more than about twice the halving's traces.
    """
    cache: dict[int, PeakMemory] = {}

    def at(b: int) -> PeakMemory:
        if b not in cache:
            cache[b] = peak_at(b)
        return cache[b]

    def fits(b: int) -> bool:
        return at(b).peak <= budget

    if not fits(1):
        return 0, None
    lo, hi = 1, 2
    while fits(hi):
        lo = hi
        if hi >= limit:
            return lo, at(lo)
        hi = min(2 * hi, limit)
    interpolate = True
    while hi - lo > 1:
        if interpolate:
            span = max(1, at(hi).peak - at(lo).peak)
            mid = min(max(lo + (budget - at(lo).peak) * (hi - lo) // span, lo + 1), hi - 1)
        else:
            mid = (lo + hi) // 2
        interpolate = not interpolate
        if fits(mid):
            lo = mid
            if hi - lo > 1 and not fits(lo + 1):
                hi = lo + 1
        else:
            hi = mid
            if hi - lo > 1 and fits(hi - 1):
                lo = hi - 1
    return lo, at(lo)


def parse_size(text: str) -> int:
    """Bytes of a size as people write it: ``24GiB``, ``80GB``, ``512MiB``, ``1.5TiB``, ``1000000``
    (binary units are powers of 1024, decimal ones of 1000; a bare number is bytes).

    Raises:
        ValueError: not a positive size (the message shows the accepted forms).
    """
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("kmgtib")
    unit = t[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"invalid size {text!r}: a number with a unit, e.g. 24GiB, 80GB or 512MiB") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"invalid size {text!r}: it must be positive")
    return int(value)


@dataclass(frozen=True)
class PeakRow:
    """One optimizer's traced peak (None with `error` where its step could not be traced) and,
    under a budget, the largest micro-batch that fits (0: not even one) with its peak."""

    name: str
    memory: PeakMemory | None
    error: str | None = None           # why it could not be traced, or (with `memory`) why `fits` is missing
    fits: int | None = None
    fits_memory: PeakMemory | None = None
    loss_gap: float | None = None      # best held-out loss minus AdamW's, from a compare sweep
    measured: dict | None = None       # real steps: {"allocated", "reserved"} or {"note"} (lowmem.cli.measure)

    def to_json(self) -> dict:
        return {"optimizer": self.name, **(self.memory.to_json() if self.memory else {}), "error": self.error,
                "largest_batch": self.fits, "largest_batch_peak": self.fits_memory.peak if self.fits_memory else None,
                "largest_batch_memory": self.fits_memory.to_json() if self.fits_memory else None,
                "loss_gap": self.loss_gap, "measured": self.measured}

    @classmethod
    def from_json(cls, doc: dict) -> "PeakRow":
        memory = PeakMemory.from_json(doc) if doc.get("peak") is not None else None
        fits = doc.get("largest_batch_memory")
        return cls(doc["optimizer"], memory, doc.get("error"), doc.get("largest_batch"),
                   PeakMemory.from_json(fits) if fits else None, doc.get("loss_gap"), doc.get("measured"))


@dataclass(frozen=True)
class PeakReport:
    """The peak of one training step per optimizer, and the settings it was traced with."""

    batch: int | None
    seq: int | None
    param_dtype: str
    autocast: str | None
    checkpointing: bool
    budget: int | None
    rows: list[PeakRow]
    world: int = 1            # FSDP2 ranks: the figures are one rank's
    measured_on: str | None = None   # the device real steps ran on, when they did

    def to_json(self) -> dict:
        return {"batch": self.batch, "seq": self.seq, "param_dtype": self.param_dtype, "autocast": self.autocast,
                "activation_checkpointing": self.checkpointing, "budget": self.budget, "world": self.world,
                "measured_on": self.measured_on, "rows": [r.to_json() for r in self.rows]}

    @classmethod
    def from_json(cls, doc: dict) -> "PeakReport":
        """The report `to_json` wrote (ValueError: not such a document)."""
        try:
            return cls(doc["batch"], doc["seq"], doc["param_dtype"], doc["autocast"], doc["activation_checkpointing"],
                       doc["budget"], [PeakRow.from_json(r) for r in doc["rows"]], doc.get("world", 1),
                       doc.get("measured_on"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a peak-memory document (missing or malformed {e})") from None

    def with_loss_gaps(self, gaps: dict[str, float], states: dict[str, int] | None = None) -> "PeakReport":
        """The report with each row's loss gap to AdamW from a compare sweep (`gaps`, by the
        row's name, which is the sweep's spelling: ``eve``, ``eve:int8``, ``plan``). A candidate
        of the sweep the report has no row for (another package's optimizer, a ``module:Class``)
        gets a row of its own: its gap, no trace, and in its note the state bytes the sweep
        measured (`states`, by name)."""
        rows = [replace(r, loss_gap=gaps.get(r.name)) for r in self.rows]
        have = {r.name for r in rows}
        for name, gap in gaps.items():
            if name not in have:
                state = (states or {}).get(name)
                rows.append(PeakRow(name, None, "not traced: memory traces lowmem's optimizers in the --state formats "
                                    "asked for, Muon and the --plan given, not other packages' optimizers or a "
                                    "module:Class; trained in the sweep" +
                                    (f", whose live optimizer kept {state:,} bytes of state" if state is not None
                                     else ""), loss_gap=gap))
        return replace(self, rows=rows)

    def with_measurements(self, measured: dict[str, dict], device: str) -> "PeakReport":
        """The report with each row's real-step measurement on `device` (by row name)."""
        return replace(self, measured_on=device, rows=[replace(r, measured=measured.get(r.name)) for r in self.rows])


def peak_report(build_model: Callable[[], nn.Module], example_batch: Any,
                loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                optimizers: dict[str, Callable[[nn.Module], torch.optim.Optimizer]], *,
                batch: int | None = None, seq: int | None = None, param_dtype: str | None = "fp32",
                autocast: str | None = None, checkpointing: bool = False, budget: int | None = None,
                world: int = 1) -> PeakReport:
    """Trace the peak of a training step for each optimizer in `optimizers` (name -> builder over
    the model), at `batch` × `seq` (`resized_batch` of `example_batch`; None: its own size), and
    with a `budget` in bytes the largest micro-batch that fits for each. The model is cast to
    `param_dtype` (a `DTYPES` name), or with None left in the dtypes `build_model` gives it
    (recorded as ``"as built"``).

    The forward and backward are traced once per batch size and shared by every optimizer; each
    optimizer's step is traced once (`combine`, exact against `trace_peak`). With `world` > 1
    (FSDP2 on that many ranks; `batch` is one rank's) each optimizer's whole steps are traced
    (`trace_peak`), per batch size the search tries.

    Raises:
        PeakTraceError: the forward and backward cannot be traced (an optimizer whose step cannot
            be is a row with an error instead).
    """
    logger = logging.getLogger("torch._subclasses.fake_tensor")   # it logs each op that fails under fake
    level = logger.level                                            # tensors; the rows report them
    logger.setLevel(logging.CRITICAL)
    try:
        return _peak_report(build_model, example_batch, loss_fn, optimizers, batch, seq, param_dtype, autocast,
                            checkpointing, budget, world)
    finally:
        logger.setLevel(level)


def _peak_report(build_model, example_batch, loss_fn, optimizers, batch, seq, param_dtype, autocast, checkpointing,
                 budget, world) -> PeakReport:
    dtype, amp = DTYPES[param_dtype] if param_dtype else None, DTYPES[autocast] if autocast else None
    traced: dict[int | None, PeakMemory] = {}

    def forward_backward(b: int | None) -> PeakMemory:
        if b not in traced:
            fb = trace_forward_backward(build_model, lambda: resized_batch(example_batch, b, seq), loss_fn,
                                        param_dtype=dtype, autocast=amp, checkpointing=checkpointing)
            traced[b] = replace(fb, batch=b, seq=seq)
        return traced[b]

    def peak_at(make) -> Callable[[int | None], PeakMemory]:
        """The peak of training with `make`'s optimizer at a batch size."""
        if world > 1:
            return lambda b: replace(trace_peak(build_model, lambda: resized_batch(example_batch, b, seq), loss_fn, make,
                                                param_dtype=dtype, autocast=amp, checkpointing=checkpointing,
                                                world=world), batch=b, seq=seq)
        step = trace_optimizer_step(build_model, make, param_dtype=dtype)
        return lambda b: combine(forward_backward(b), step)

    if world == 1:
        forward_backward(batch)     # the model's own failure ends the report, before any optimizer
    rows = []
    for name, make in optimizers.items():
        try:
            at = peak_at(make)
            memory = at(batch)
        except PeakTraceError as e:
            rows.append(PeakRow(name, None, str(e)))
            continue
        except Exception as e:     # another package's optimizer that fake tensors cannot run: a row, not the end
            where = " under FSDP2" if world > 1 else ""
            rows.append(PeakRow(name, None, f"its step cannot run on fake tensors{where} ({type(e).__name__}: "
                                            f"{str(e).splitlines()[0] if str(e) else ''})"))
            continue
        fits = fits_memory = note = None
        if budget is not None:
            try:
                fits, fits_memory = largest_batch(at, budget)
            except (PeakTraceError, *FAKE_ERRORS, Exception) as e:   # e.g. a batch whose dim 0 is not the batch
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                note = (f"no largest batch: the step fails when dimension 0 of the batch is resized ({first}); "
                        "its peak at the batch's own size stands")
        rows.append(PeakRow(name, memory, note, fits, fits_memory))
    return PeakReport(batch, seq, param_dtype or "as built", autocast, checkpointing, budget, rows, world)
