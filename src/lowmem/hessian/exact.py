"""Exact block Hessians of a model's loss through Hessian-vector products (DESIGN §6).

The loss is the `model.py` contract's ``loss_fn(model, batch)``, averaged over `batches`. A
*piece* is one parameter or a sub-view of it (``"h.0.attn.c_attn.weight[part=q, head=1]"``,
``"mlp.c_fc.weight[0:16]"``); a block is H_AB = ∂²L / ∂θ_A ∂θ_B over two pieces (A = B for a
diagonal block), each flattened row-major in the parameter's own index order.

How: the pieces become free variables x (one tensor per parameter touched, holding the union of
the entries the pieces take from it), substituted into the parameters with an out-of-place
``index_put`` and run through `torch.func.functional_call`, so nothing else of the model enters
the graph as a variable. One forward and one backward with ``create_graph=True`` give ∇ₓL; each
row of H_AB is then the gradient of ⟨eᵢ, ∇_A L⟩ with respect to x_B, computed for a chunk of
rows at a time with one batched double backward (``is_grads_batched``, vmap over the backward
graph) that reuses the graph: about one backward pass per row, memory bounded by the chunk.
Rows fall back to a plain loop where an operator has no batching rule.

The model runs in ``eval()`` (restored afterwards), in float64 on request (on a copy), with
scaled-dot-product attention forced to the math kernel: the fused CPU kernels have no double
backward. A forward pass that is still random in eval() (functional dropout, sampling) is
refused, since its "Hessian" would change from call to call.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lowmem.compress.memory import format_bytes
from lowmem.layers import ParamInfo, normalize_name, resolve_layers
from lowmem.snr.views import param_views

LossFn = Callable[[nn.Module, Any], torch.Tensor]

DEFAULT_CHUNK = 64


class HessianError(ValueError):
    """A block Hessian that cannot be computed as asked; the message says why and what to do."""


class HessianTooLarge(HessianError):
    """The dense block would not fit in the memory allowed."""


class RandomForwardError(HessianError):
    """The loss differs between two identical forward passes in eval() mode."""


class LossFnError(HessianError):
    """``loss_fn`` returned something other than a real floating-point scalar tensor with a
    gradient: the same for every block, so nothing can be computed until it is fixed."""


class DisconnectedError(HessianError):
    """The loss has no gradient path to a piece (its parameter is not used by the forward pass),
    so its Hessian block is undefined. A piece that enters the loss linearly is connected: its
    block is exactly zero, and `block_hessian` returns zeros."""


# -- pieces -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A parameter or a sub-view of it: `name` (canonical), the parameter's `shape` (as
    `lowmem.layers` reads it: `ParamInfo.view_shape`, e.g. DBRX's (experts·rows, hidden) stack as
    (experts, rows, hidden)), `index`, the flat row-major positions it takes (ascending; the same
    in the tensor and in that reshape), `box`, the shape of the sub-view, and `label`, the
    selector as the user wrote it."""

    name: str
    shape: tuple[int, ...]
    index: torch.Tensor
    box: tuple[int, ...]
    label: str

    @property
    def numel(self) -> int:
        return int(self.index.numel())


_SELECTOR = re.compile(r"^(?P<name>[^\[\]]+?)\s*(?:\[(?P<spec>[^\[\]]*)\])?$")
_KEYS = ("part", "head")


def piece(model: nn.Module, selector: str | Piece, layers=None) -> Piece:
    """Resolve a selector into a `Piece`.

    Grammar: ``NAME`` or ``NAME[ITEMS]``, ITEMS comma-separated. ``part=q|k|v`` takes one part
    of a fused Q/K/V projection and ``head=K`` one head (of that part, for a fused weight), both
    along the parameter's output axis (`lowmem.layers` says which dim that is and how wide a
    head is); ``a:b`` or ``i`` then slice the dims in order (as numpy does, without steps) within
    what part/head took, wherever they are written: ``W[0:2, head=1]`` is rows 0-1 of head 1. A
    parameter that `lowmem.layers` reads as a reshape (`ParamInfo.view`: DBRX's expert stacks) is
    sliced in that shape: ``w1[0]`` is expert 0's matrix.

    Raises:
        HessianError: unknown, frozen or empty parameter, malformed selector, a part/head the
            layer lacks, a key given twice, an empty or out-of-range slice.
        TypeError: `selector` is neither a string nor a `Piece`.
    """
    if isinstance(selector, Piece):
        layers = layers if layers is not None else resolve_layers(model, warn=False)
        info = _trainable(model, layers, selector.name, selector.label)
        if info.view_shape != selector.shape:
            raise HessianError(f"{selector.label!r}: the Piece is of a parameter of shape {selector.shape}, but "
                               f"{info.name} in this model has shape {info.view_shape}")
        return selector
    if not isinstance(selector, str):
        raise TypeError(f"a block selector is a string such as 'fc.weight[0:4]' or a Piece, got "
                        f"{type(selector).__name__} {selector!r:.60}")
    m = _SELECTOR.match(selector.strip())
    if not m:
        raise HessianError(f"{selector!r}: cannot read the block selector; expected NAME or "
                           "NAME[a:b, part=q, head=0]")
    layers = layers if layers is not None else resolve_layers(model, warn=False)
    info = _trainable(model, layers, normalize_name(m.group("name").strip()), selector)
    shape = info.view_shape     # slices apply to the dims that the layer's axes name
    if math.prod(shape) == 0:
        raise HessianError(f"{selector!r}: {info.name} has no entries (shape {shape})")
    keys, slices = {}, []
    for item in filter(None, (s.strip() for s in (m.group("spec") or "").split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            slices.append(item)
        elif key not in _KEYS:
            raise HessianError(f"{selector!r}: unknown key {key!r} (expected part= or head=)")
        elif key in keys:
            raise HessianError(f"{selector!r}: {key}= is given twice")
        else:
            keys[key] = value
    box = [slice(0, s) for s in shape]
    if info.part_source is not None and "part" in keys and "head" not in keys:
        # An interleaved part (each head's or group's q, k, v rows together) is a strided set of
        # rows: its entries in the order of the part's view, one group's rows after another.
        if slices:
            raise HessianError(f"{selector!r}: {info.name}'s parts are interleaved; name a head to slice within "
                               f"(e.g. {info.name}[part={keys['part']}, head=0, 0:4])")
        view = next((v for v in param_views(info) if v.name == keys["part"]), None)
        if view is None:
            raise HessianError(f"{selector!r}: part must be one of {', '.join(n for n, _ in info.parts)}, "
                               f"got {keys['part']!r}")
        flat = view.apply(torch.arange(math.prod(shape)).view(shape)).reshape(-1)
        return Piece(info.name, shape, flat, tuple(view.shape), selector)
    if keys:          # part and head first, so the slices apply inside them whatever the order written
        if not shape:
            raise HessianError(f"{selector!r}: {info.name} is a scalar; it has no parts or heads")
        out = info.fan_out_dims[0] if info.fan_out_dims else 0
        box[out] = _output_rows(info, selector, keys.get("part"), keys.get("head"))
    if len(slices) > len(shape):
        raise HessianError(f"{selector!r}: {len(slices)} slices, but {info.name} has {len(shape)} dim(s) "
                           f"(shape {shape})")
    for dim, item in enumerate(slices):     # positional slices apply to dims 0, 1, … in order
        sub = _parse_slice(item, box[dim].stop - box[dim].start, selector)
        box[dim] = slice(box[dim].start + sub.start, box[dim].start + sub.stop)
    flat = torch.arange(math.prod(shape)).view(shape)[tuple(box)].reshape(-1)
    return Piece(info.name, shape, flat, tuple(s.stop - s.start for s in box), selector)   # tied: canonical


def _trainable(model: nn.Module, layers, name: str, selector: str) -> ParamInfo:
    """The trainable parameter `name`, or an error that says what the name is instead (frozen,
    a buffer, a module) or which names are near it."""
    try:
        return layers[name]
    except KeyError:
        pass
    frozen = {normalize_name(n) for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    if name in frozen:
        raise HessianError(f"{selector!r}: {name} is frozen (requires_grad=False): the Hessian is taken over "
                           "trainable parameters only; call requires_grad_(True) on it to include it")
    if name in {normalize_name(n) for n, _ in model.named_buffers()}:
        raise HessianError(f"{selector!r}: {name} is a buffer, not a parameter: the loss has no Hessian with "
                           "respect to it")
    names = [n for info in layers for n in info.names]
    if not names:
        raise HessianError(f"{selector!r}: the model has no trainable parameters")
    inside = [n for n in names if n.startswith(name + ".")]
    if inside:
        raise HessianError(f"{selector!r}: {name} is a module, not a parameter; its parameters: "
                           f"{', '.join(inside[:6])}{' …' if len(inside) > 6 else ''}")
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    raise HessianError(f"{selector!r}: no trainable parameter {name!r} in the model; "
                       + (f"did you mean {' or '.join(near)}?" if near else
                          f"the first ones are {', '.join(names[:4])}"))


def _output_rows(info: ParamInfo, selector: str, part: str | None, head: str | None) -> slice:
    """The span of the output axis that ``part=`` and ``head=`` select."""
    out = info.fan_out_dims[0] if info.fan_out_dims else 0
    start, stop, heads = 0, info.view_shape[out], info.heads
    if part is not None:
        if not info.parts:
            raise HessianError(f"{selector!r}: {info.name} is not a fused Q/K/V projection (it has no parts)")
        names = [n for n, _ in info.parts]
        if part not in names:
            raise HessianError(f"{selector!r}: part must be one of {', '.join(names)}, got {part!r}")
        i = names.index(part)
        start = sum(size for _, size in info.parts[:i])
        stop = start + info.parts[i][1]
        heads = info.part_heads[i] if info.part_heads else None
        if info.part_groups and head is not None:   # interleaved: head h's rows lie in its group
            h = _head_index(head, heads, selector)
            per = heads // info.part_groups                     # this part's heads per group
            group_rows = info.view_shape[out] // info.part_groups
            width = (stop - start) // per
            first = (h // per) * group_rows + start + (h % per) * width
            return slice(first, first + width)
    elif info.parts and head is not None:
        raise HessianError(f"{selector!r}: {info.name} is a fused Q/K/V projection; name the part of the head "
                           f"as well, e.g. {info.name}[part={info.parts[0][0]}, head={head}]")
    if head is None:
        return slice(start, stop)
    if not heads or (stop - start) % heads:
        first = info.view_shape[0] if info.view_shape else 0
        example = f"[0:{min(16, first)}]" if first > 1 else "[0]"
        what = f"{info.name} is a stack of experts, not an attention projection: it has no heads" \
            if "expert" in info.axes else f"the number of heads of {info.name} is not known"
        raise HessianError(f"{selector!r}: {what} (select with a slice of its first dim instead, e.g. "
                           f"{info.name}{example}, of {first})")
    h = _head_index(head, heads, selector)
    width = (stop - start) // heads
    return slice(start + h * width, start + (h + 1) * width)


def _head_index(head: str, heads: int, selector: str) -> int:
    try:
        h = int(head)
    except ValueError:
        raise HessianError(f"{selector!r}: head must be an integer, got {head!r}") from None
    if not 0 <= h < heads:
        raise HessianError(f"{selector!r}: head {h} out of range (0..{heads - 1})")
    return h


def _parse_slice(text: str, size: int, selector: str) -> slice:
    a, colon, b = text.partition(":")
    try:
        if not colon:
            i = int(a)
            start = i + size if i < 0 else i
            stop = start + 1
        else:
            start = int(a) if a.strip() else 0
            stop = int(b) if b.strip() else size
            start, stop = (start + size if start < 0 else start), (stop + size if stop < 0 else stop)
    except ValueError:
        raise HessianError(f"{selector!r}: cannot read slice {text!r}; expected integers a:b (no step) "
                           "or one index i") from None
    if 0 <= start and stop <= size and start >= stop:
        raise HessianError(f"{selector!r}: slice {text!r} is empty (it must take at least one entry)")
    if not 0 <= start < stop <= size:
        raise HessianError(f"{selector!r}: slice {text!r} is out of range for a dim of size {size} "
                           f"(0:{size} is all of it)")
    return slice(start, stop)


# -- memory ------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes the OS says are available (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def block_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes of the dense (rows × cols) block."""
    return rows * cols * torch.finfo(dtype).bits // 8


def check_fits(a: Piece, b: Piece, dtype: torch.dtype, max_bytes: int | None) -> None:
    """Refuse a block whose dense result exceeds `max_bytes` (default: half the available memory).

    Raises:
        HessianTooLarge: with the size, the limit, and what to do instead.
    """
    need = block_bytes(a.numel, b.numel, dtype)
    limit = max_bytes if max_bytes is not None else (available_memory() or 8 << 30) // 2
    if need > limit:
        raise HessianTooLarge(
            f"the block {a.label} × {b.label} is {a.numel:,} × {b.numel:,} entries: {format_bytes(need)} "
            f"in {str(dtype).replace('torch.', '')}, over the {format_bytes(limit)} allowed. Select a "
            f"sub-view ({_fitting_rows(a, b, dtype, limit)}; [head=0] takes one head of an attention weight), "
            "or use the estimates in lowmem.hessian.estimates (Hutchinson diagonal, Lanczos eigenvalues, "
            "partition mass from probes), which need only Hessian-vector products")


def _fitting_rows(a: Piece, b: Piece, dtype: torch.dtype, limit: int) -> str:
    """Words for the largest leading rows of `a`'s parameter whose block fits in `limit` bytes."""
    if a.label != a.name:                                    # already a sub-view: no slice to suggest on it
        return "a smaller one"
    row = a.numel // a.box[0] if a.box else 1                # entries per index of the first dim
    per = torch.finfo(dtype).bits // 8
    k = math.isqrt(limit // per) // row if a is b else limit // (per * row * b.numel)
    if k < 1:
        return f"even one row of {a.name} is over the limit"
    return f"e.g. '{a.name}[0:{k}]', its first {k:,} rows, fits"


# -- the model, prepared ------------------------------------------------------------------------
class _Loss(nn.Module):
    """``loss_fn(model, batch)`` as a module, so `functional_call` can substitute parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return _scalar_loss(self.loss_fn(self.model, batch), self.loss_fn)


def _loss_fn_name(loss_fn) -> str:
    name = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
    return "loss_fn" if name == "loss_fn" else f"loss_fn ({name})"


def _scalar_loss(value, loss_fn) -> torch.Tensor:
    """`value` as a 0-d tensor, or a `LossFnError` naming `loss_fn`, what it returned and what to do."""
    what = f"{_loss_fn_name(loss_fn)} must return the loss as a scalar torch.Tensor"
    if not isinstance(value, torch.Tensor):
        if value is None:
            raise LossFnError(f"{what}; it returned None (is a return statement missing?)")
        hint = " (a Python number has no gradient)" if isinstance(value, (int, float)) else ""
        raise LossFnError(f"{what}; it returned {type(value).__name__} {value!r:.60}{hint}")
    if value.numel() != 1:
        raise LossFnError(f"{what}; it returned a tensor of shape {tuple(value.shape)}: reduce it to one number "
                          "(e.g. .mean())")
    if not value.is_floating_point():
        raise LossFnError(f"{what} of a real floating-point dtype; it returned a tensor of dtype "
                          f"{str(value.dtype).replace('torch.', '')}")
    return value.reshape(())


def _cast(batch, dtype: torch.dtype | None):
    if dtype is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cast(b, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    return batch


@contextlib.contextmanager
def prepared(model: nn.Module, dtype: torch.dtype | None):
    """The model in eval() (in `dtype` on a copy when it differs), attention on the math kernel."""
    params = list(model.parameters())
    base_dtype = params[0].dtype if params else torch.float32
    work = model if dtype is None or dtype == base_dtype else copy.deepcopy(model).to(dtype)
    was_training = work.training
    work.eval()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = sdpa_kernel(SDPBackend.MATH)
    except ImportError:   # older torch: its default falls back to math for double backward anyway
        kernel = contextlib.nullcontext()
    try:
        with kernel:
            yield work
    finally:
        work.train(was_training)


def check_deterministic(loss_module: nn.Module, batch) -> None:
    """Refuse a forward pass whose loss changes between two identical calls in eval() mode."""
    with torch.no_grad():
        a, b = float(loss_module(batch)), float(loss_module(batch))
    if a != b and not (math.isnan(a) and math.isnan(b)):
        raise RandomForwardError(
            f"the loss is random even in eval() mode ({a!r} then {b!r} on the same batch): an exact "
            "Hessian needs a deterministic loss. Remove functional dropout / sampling from the forward "
            "pass or fix their seed inside loss_fn")
    if not math.isfinite(a):
        raise HessianError(f"the loss is not finite ({a}) on the first batch")


# -- the block ----------------------------------------------------------------------------------
class _Variables:
    """The free variables for a set of pieces: per parameter, the union of the entries the pieces
    take from it, concatenated into one vector space U; where each piece sits in U."""

    def __init__(self, pieces: Sequence[Piece], model: nn.Module):
        self.names: list[str] = []
        self.index: dict[str, torch.Tensor] = {}
        for p in pieces:
            if p.name not in self.index:
                self.names.append(p.name)
                self.index[p.name] = p.index
            else:
                self.index[p.name] = torch.unique(torch.cat([self.index[p.name], p.index]))
        self.offset, start = {}, 0
        for n in self.names:
            self.offset[n] = start
            start += self.index[n].numel()
        self.dim = start
        # canonical name -> (the name functional_call knows it by, the parameter)
        self.params = {normalize_name(n): (n, p) for n, p in model.named_parameters()}

    def position(self, p: Piece) -> torch.Tensor:
        """Positions of `p`'s entries (in its order) within U."""
        return torch.searchsorted(self.index[p.name], p.index) + self.offset[p.name]   # both ascending

    def leaves(self) -> list[torch.Tensor]:
        return [self.params[n][1].detach().reshape(-1)[self.index[n]].clone().requires_grad_(True)
                for n in self.names]

    def substituted(self, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for n, x in zip(self.names, xs):
            raw, param = self.params[n]
            base = param.detach()
            out["model." + raw] = base.reshape(-1).index_put((self.index[n].to(base.device),), x).view(base.shape)
        return out


def block_hessian(model: nn.Module, loss_fn: LossFn, batches: Iterable, name: str | Piece,
                  other: str | Piece | None = None, dtype: torch.dtype | None = None, *,
                  chunk: int = DEFAULT_CHUNK, max_bytes: int | None = None,
                  batched: bool | None = None) -> torch.Tensor:
    """The exact Hessian block of the mean loss over `batches`.

    Args:
        model: any module; it is put in eval() for the computation and restored.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (the `model.py` contract).
        batches: one or more batches; the loss is their mean (each batch weighs the same).
        name: the piece A (a selector, see `piece`, or a `Piece`).
        other: the piece B for a cross block H_AB; None for the diagonal block H_AA.
        dtype: compute in this dtype on a copy of the model (e.g. ``torch.float64``).
        chunk: rows per batched double backward (bounds the extra memory).
        max_bytes: refuse a result larger than this (default: half the available memory).
        batched: rows by vmap over the backward graph (True) or a loop of double backwards
            (False); None: whichever is faster on the first chunk.

    Returns:
        A dense (numel_A, numel_B) tensor, pieces flattened row-major, in `dtype` (or the
        model's dtype), on the model's device.

    A piece that enters the loss linearly (a bias followed by a mean, ``(w * x).sum()``) has an
    exactly zero block, returned as zeros; one the loss does not depend on at all is an error.

    Raises:
        HessianError: a bad selector or no batches; HessianTooLarge: the block would not fit;
        RandomForwardError: the forward pass is random in eval() mode; LossFnError: loss_fn does
        not return a finite real scalar tensor with a gradient; DisconnectedError: the loss does
        not depend on a piece. ValueError / TypeError: a bad chunk, dtype, max_bytes or argument type.
    """
    batches = _check_arguments(model, loss_fn, batches, dtype)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"Invalid chunk: {chunk!r} (rows per double backward: an integer >= 1)")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float))
                                  or not 0 <= max_bytes < math.inf):
        raise ValueError(f"Invalid max_bytes: {max_bytes!r} (a number of bytes >= 0, or None for half the "
                         "available memory)")
    layers = resolve_layers(model, warn=False)
    a = piece(model, name, layers)
    b = piece(model, other, layers) if other is not None else a
    work_dtype = dtype or next(model.parameters()).dtype
    check_fits(a, b, work_dtype, max_bytes)
    with prepared(model, dtype) as work:
        loss_module = _Loss(work, loss_fn)
        variables = _Variables([a, b] if b is not a else [a], work)
        pos_a, pos_b = variables.position(a), variables.position(b)
        device = variables.params[a.name][1].device
        out = torch.zeros(a.numel, b.numel, dtype=work_dtype, device=device)
        casted = [_cast(batch, dtype) for batch in batches]
        check_deterministic(loss_module, casted[0])
        for batch in casted:
            out += _rows(loss_module, variables, batch, pos_a.to(device), pos_b.to(device), chunk, batched)
        return out.div_(len(casted))


def _check_arguments(model, loss_fn, batches, dtype) -> list:
    """The batches as a list, after the checks `block_hessian` and `HessianOperator` share."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function loss_fn(model, batch) -> scalar tensor, got "
                        f"{type(loss_fn).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"Invalid dtype: {dtype!r}; expected a floating-point torch.dtype such as torch.float64, "
                        "or None for the model's own")
    if isinstance(batches, torch.Tensor):     # iterating would make every row a batch
        raise TypeError("batches is one tensor; pass a list of batches, e.g. [batch] or [(x, y)]")
    try:
        batches = list(batches)
    except TypeError:
        raise TypeError(f"batches must be a list (or iterable) of batches, e.g. [batch]; got "
                        f"{type(batches).__name__}") from None
    if not batches:
        raise HessianError("no batches given: the Hessian is of the mean loss over at least one batch")
    return batches


def _rows(loss_module: nn.Module, variables: _Variables, batch, pos_a: torch.Tensor, pos_b: torch.Tensor,
          chunk: int, batched: bool | None) -> torch.Tensor:
    """H_AB of one batch: the gradient with respect to U of ⟨V, ∇_U L⟩ for one-hot rows V at A's
    positions, `chunk` rows at a time, columns read at B's positions. With `batched` None, the
    first chunk is timed both ways (vmap over the backward graph, and a loop) and the faster
    per row does the rest: which wins depends on the model, the batch and the device."""
    xs = variables.leaves()
    g = _gradient(loss_module, variables, xs, batch)

    def one_hot(sel):
        v = torch.zeros(sel.numel(), variables.dim, dtype=g.dtype, device=g.device)
        v[torch.arange(sel.numel(), device=g.device), sel] = 1
        return v

    rows, start = [], 0
    if batched is None and pos_a.numel() > 1:
        half = max(1, min(chunk, pos_a.numel()) // 2)
        per_row = {}
        for mode, sel in ((True, pos_a[:half]), (False, pos_a[half:2 * half])):
            t0 = time.perf_counter()
            rows.append(_double_backward(g, xs, one_hot(sel), mode)[:, pos_b])
            _sync(g.device)
            per_row[mode] = (time.perf_counter() - t0) / max(1, sel.numel())
        start, batched = 2 * half, per_row[True] < per_row[False]
    for start in range(start, pos_a.numel(), chunk):
        rows.append(_double_backward(g, xs, one_hot(pos_a[start:start + chunk]), bool(batched))[:, pos_b])
    return torch.cat(rows)


def _gradient(loss_module: _Loss, variables: _Variables, xs: list[torch.Tensor], batch) -> torch.Tensor:
    """∇ₓL of one batch, flat over U, with the graph kept for the second derivative.

    Raises:
        LossFnError: the loss has no gradient at all (detached, under no_grad, a constant), or is
            not finite. DisconnectedError: it has none with respect to a piece's parameter.
    """
    loss = torch.func.functional_call(loss_module, variables.substituted(xs), (batch,), strict=False)
    name = _loss_fn_name(loss_module.loss_fn)
    if not loss.requires_grad:
        raise LossFnError(f"{name} returned a loss with no gradient (requires_grad is False): it was computed "
                          "under torch.no_grad(), detached, made from a Python number, or does not use the "
                          "model's trainable parameters")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise LossFnError(f"{name} returned a loss that is not finite ({value}) on one of the batches")
    grads = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
    unused = [n for n, grad in zip(variables.names, grads) if grad is None]
    if unused:
        raise DisconnectedError(
            f"the loss does not depend on {', '.join(unused)}: there is no gradient path from the loss to it "
            "(is it used in the forward pass, and not only through .detach() or integer ops?), so its "
            "Hessian block is undefined")
    return torch.cat([t.reshape(-1) for t in grads])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _double_backward(g: torch.Tensor, xs: list[torch.Tensor], v: torch.Tensor, batched: bool) -> torch.Tensor:
    """Rows vᵢᵀ ∂g/∂x for a batch of vectors (k, dim U): one batched double backward (vmap over
    the backward graph) or a loop of plain ones; batched falls back to the loop where an
    operator has no batching rule. A gradient without a graph (the loss is linear in every
    variable, e.g. a bias followed by a mean) has a zero derivative: zero rows."""
    if not g.requires_grad:
        return torch.zeros(v.shape[0], sum(x.numel() for x in xs), dtype=g.dtype, device=g.device)
    if batched:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*performance drop.*")
                parts = torch.autograd.grad(g, xs, grad_outputs=v, retain_graph=True, is_grads_batched=True,
                                            allow_unused=True)
            return _flat(parts, xs, v.shape[0])
        except (RuntimeError, UserWarning):
            pass
    out = []
    for row in v:
        parts = torch.autograd.grad(g, xs, grad_outputs=row, retain_graph=True, allow_unused=True)
        out.append(_flat(parts, xs, None))
    return torch.stack(out)


def _flat(parts, xs, k: int | None) -> torch.Tensor:
    flat = []
    for p, x in zip(parts, xs):
        shape = (k, x.numel()) if k is not None else (x.numel(),)
        flat.append(torch.zeros(shape, dtype=x.dtype, device=x.device) if p is None else p.reshape(shape))
    return torch.cat(flat, dim=-1)


# -- Hessian-vector products for the estimates -------------------------------------------------
class HessianOperator:
    """V ↦ H V for the Hessian of the mean loss over `batches` with respect to the concatenation
    of `pieces` (rows of V are vectors in that space), for `lowmem.hessian.estimates`. Each call
    runs one double backward per batch through graphs built once and kept (memory: one graph
    per batch)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Iterable, pieces: Sequence[str | Piece],
                 dtype: torch.dtype | None = None):
        self.batches = _check_arguments(model, loss_fn, batches, dtype)
        if isinstance(pieces, (str, Piece)):
            pieces = [pieces]
        layers = resolve_layers(model, warn=False)
        self.pieces = [piece(model, p, layers) for p in pieces]
        if not self.pieces:
            raise HessianError("no pieces given: the operator acts on the concatenation of at least one piece")
        self._stack = contextlib.ExitStack()
        self._graphs = []
        work = self._stack.enter_context(prepared(model, dtype))
        try:
            loss_module = _Loss(work, loss_fn)
            self._vars = _Variables(self.pieces, work)
            self._pos = torch.cat([self._vars.position(p) for p in self.pieces])
            if torch.unique(self._pos).numel() != self._pos.numel():
                raise HessianError(f"the pieces {', '.join(p.label for p in self.pieces)} overlap: the operator "
                                   "acts on their concatenation, so each entry may be in one piece only")
            casted = [_cast(b, dtype) for b in self.batches]
            check_deterministic(loss_module, casted[0])
            for batch in casted:
                xs = self._vars.leaves()
                self._graphs.append((_gradient(loss_module, self._vars, xs, batch), xs))
        except BaseException:       # leave the model as it was: its training mode, no kept graphs
            self.close()
            raise
        self.dim = int(self._pos.numel())
        self.dtype = self._graphs[0][0].dtype
        self.device = self._graphs[0][0].device
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if not self._graphs:
            raise HessianError("the HessianOperator is closed; make a new one")
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.shape[-1] != self.dim:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"expected a vector of {self.dim} entries or a (k, {self.dim}) tensor of rows, "
                             f"got {shape}")
        single = v.dim() == 1
        v = v.reshape(-1, self.dim).to(self.dtype)
        full = torch.zeros(v.shape[0], self._vars.dim, dtype=self.dtype, device=self.device)
        full[:, self._pos.to(self.device)] = v
        out = sum(_double_backward(g, xs, full, v.shape[0] > 1) for g, xs in self._graphs) / len(self._graphs)
        self.calls += v.shape[0]
        out = out[:, self._pos.to(self.device)]
        return out[0] if single else out

    def close(self) -> None:
        """Free the kept graphs and restore the model's mode."""
        self._graphs.clear()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
