"""Views of a parameter in which SNR is measured: the raw tensor, per-head splits, fused Q/K/V parts.

A view is a slice of one axis (for a fused projection's q, k or v part; of the ``out`` axis read
as (groups, rows per group) where the parts are interleaved, `ParamInfo.part_source`) followed by
a reshape that splits the ``out`` axis into ``(head, out)``. All are expressible in a plan (the
layer's `view` is the shape sliced, a part's ``start:stop`` the slice, its `view` the reshape),
so whatever the SNR favours can be built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem.layers import ParamInfo
from lowmem.snr.keys import ViewLabel

_AXIS_WORDS = {"out": "fan_out", "in": "fan_in", "token": "token", "model": "model",
               "head": "head", "kh": "kh", "kw": "kw", "kd": "kd", "expert": "expert"}


@dataclass(frozen=True)
class View:
    """One way of looking at a parameter's `v`.

    Attributes:
        name: ``raw``, ``heads``, ``q``, ``q.heads``, …
        part: for a fused projection, the part name (``q``/``k``/``v``), else None.
        dim: the sliced dim of the raw tensor, or of `source` (parts only).
        start, stop: the slice along `dim` (parts only).
        source: the shape the raw tensor is read as before slicing (interleaved parts), or None.
        shape: the view's shape (after slicing and reshaping).
        axes: the meaning of each dim of the view.
    """

    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    part: str | None = None
    dim: int | None = None
    start: int | None = None
    stop: int | None = None
    source: tuple[int, ...] | None = None

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if self.source is not None:
            t = t.reshape(self.source)
        if self.part is not None:
            t = t.narrow(self.dim, self.start, self.stop - self.start)
        return t.reshape(self.shape)

    def label(self) -> ViewLabel:
        """Name and shape, as the trajectory CSV names the view (``heads:4x32x128``)."""
        return ViewLabel(self.name, tuple(self.shape))


def part_of(view_name: str) -> str:
    """The first component of a view name: a fused projection's part (``q`` of ``q`` and
    ``q.heads``, as `param_views` names them); ``raw`` or ``heads`` for other views."""
    return view_name.split(".")[0]


def describe_subset(axes: tuple[str, ...], subset: tuple[int, ...]) -> str:
    """Human words for averaging over `subset`, e.g. ``fan_in`` or ``head+fan_out``."""
    return "+".join(_AXIS_WORDS.get(axes[d], axes[d]) for d in subset)


def subset_words(view: View, subset: tuple[int, ...]) -> str:
    """`describe_subset` in `view`, saying "per head" when a head view keeps its heads apart."""
    words = describe_subset(view.axes, subset)
    if "head" in view.axes and all(view.axes[d] != "head" for d in subset):
        return f"{words} per head"
    return words


def split_heads(shape, axes, heads):
    """Split the ``out`` axis into (head, out); None when heads do not divide it."""
    if not heads or "out" not in axes:
        return None
    d = axes.index("out")
    if shape[d] % heads or heads == 1:
        return None
    new_shape = (*shape[:d], heads, shape[d] // heads, *shape[d + 1:])
    new_axes = (*axes[:d], "head", "out", *axes[d + 1:])
    return new_shape, new_axes


def param_views(info: ParamInfo) -> list[View]:
    """Every view in which the SNR of this parameter is measured (DESIGN §3)."""
    shape, axes = info.view_shape, tuple(info.axes)
    if info.parts:
        views = []
        d = axes.index("out")
        groups, source, at = info.part_groups or 1, info.part_source, info.part_dim
        start = 0
        heads = info.part_heads or (None,) * len(info.parts)
        for (part, size), h in zip(info.parts, heads):
            pshape = (*shape[:d], groups * size, *shape[d + 1:])   # a part's rows of every group, in order
            views.append(View(part, pshape, axes, part, at, start, start + size, source))
            split = split_heads(pshape, axes, h)
            if split:
                views.append(View(f"{part}.heads", split[0], split[1], part, at, start, start + size, source))
            start += size
        return views
    views = [View("raw", shape, axes)]
    if info.role in ("attn_q", "attn_k", "attn_v") and info.heads:
        split = split_heads(shape, axes, info.heads)
        if split:
            views.append(View("heads", split[0], split[1]))
    return views


def unsplit_subset(view: View, subset: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
    """The (view name, subset) of the unsplit view that averages the same entries, if any.

    A head-split view turns one ``out`` axis into ``(head, out)``. A subset that takes both or
    neither of them groups the entries exactly as a subset of the unsplit view does, so its
    statistics are the same numbers (``head+out`` is fan_out; ``in`` is fan_in).
    """
    if "head" not in view.axes:
        return None
    h = view.axes.index("head")
    if (h in subset) != (h + 1 in subset):
        return None
    base = sorted({d if d < h else h if d <= h + 1 else d - 1 for d in subset})
    return ("raw" if view.name == "heads" else view.name.rsplit(".", 1)[0]), tuple(base)
