"""Checkpoints of the plan engine: `ReducedAdamW.state_dict` and ``load_state_dict``, for
single-process and row-sharded (FSDP2) parameters alike.

A state dict is torch's plus ``"lowmem"`` (the optimizer, parameter names in group order and the
plan, as plain data). Its ``exp_avg_sq`` is always the single-process one: a sharded parameter's
flat local `v` is gathered (`ShardedLayout.gather`, all-reduced: `state_dict` is collective), so a
checkpoint loads on any number of ranks. Loading accepts the optimizer's own checkpoints, another
plan optimizer's under the same plan, and `torch.optim.AdamW`'s (a full `v` is averaged per plan).

States kept in a storage format (`lowmem.compress.formats`) are saved as stored (codes and
scales, or bf16), and ``"lowmem"`` records each parameter's format under ``"formats"``. A
checkpoint in the same format loads as saved, bit for bit (a resumed run continues exactly); one
in another format (an AdamW or fp32 checkpoint into an int8 optimizer, or back) is decoded to the
compute dtype, brought to this plan's layout, and encoded in this optimizer's formats.
`adamw_state_dict` exports any plan optimizer's state as `torch.optim.AdamW` keeps it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lowmem.compress.formats import FULL, QUANTIZED, StateFormat, rows_of
from lowmem.compress.optim import state as stored
from lowmem.compress.optim._common import (StateSpec, check_hparams, check_state_dict, load_groups, local,
                                           step_tensor)
from lowmem.compress.optim.layout import Block, Layout, layout_of, reduce_v, sharded_means
from lowmem.compress.plan import LayerPlan, PartPlan, PlanError
from lowmem.layers import is_sharded, normalize_name
from lowmem.sharding import RowShards, all_reduce_by_group

if TYPE_CHECKING:
    from lowmem.compress.optim.engine import ReducedAdamW


def lowmem_meta(opt: ReducedAdamW) -> dict:
    """The ``"lowmem"`` entry of a state dict: optimizer, kind, names in group order, plan."""
    names = [opt._names[p] for g in opt.param_groups for p in g["params"]]
    return {"optimizer": type(opt).__name__, "kind": opt.kind, "names": names,
            "plan": opt.plan.to_json() if opt.plan is not None else None,
            "formats": {opt._names[p]: str(opt._formats[p]) for g in opt.param_groups for p in g["params"]},
            "rounding_rng": {k: g.get_state() for k, g in opt._rngs.items()}}


def state_dict(opt: ReducedAdamW, sd: dict) -> dict:
    """`ReducedAdamW.state_dict` from torch's state dict `sd`: the single-process ``exp_avg_sq``
    of every sharded parameter (gathered, a collective) and the ``"lowmem"`` entry."""
    params = [p for g in opt.param_groups for p in g["params"]]
    wholes = whole_v(opt, params)
    for i, p in enumerate(params):
        if p in wholes:
            sd["state"][i] = {**sd["state"][i], "exp_avg_sq": wholes[p]}
    sd["lowmem"] = lowmem_meta(opt)
    return sd


def whole_v(opt: ReducedAdamW, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
    """The single-process ``exp_avg_sq`` of each sharded parameter whose `v` is a flat local
    tensor (`ShardedLayout.gather`, all-reduced: one collective per group and dtype)."""
    out, pairs = {}, []
    for p in params:
        lay, st = opt._sharded.get(p), opt.state.get(p)
        if lay is None or lay.like_param or not st or "exp_avg_sq" not in st:
            continue
        out[p] = lay.gather(opt._layouts[p], st["exp_avg_sq"])
        pairs.append((out[p], lay.shards.group))
    all_reduce_by_group(pairs)
    return {p: t.view(opt._layouts[p].v_shape) for p, t in out.items()}


def load_state_dict(opt: ReducedAdamW, state_dict: dict) -> None:
    """`ReducedAdamW.load_state_dict` (what loads, and what is refused, is said there): every
    entry is checked before anything is loaded, then each saved state is brought to this
    optimizer's dtypes and layout (`state_from_checkpoint`)."""
    formats = _formats_of(opt, state_dict)
    check_state_dict(opt, state_dict, group_keys=("lr", "betas", "eps", "weight_decay"),
                     check_group=lambda g: check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"]),
                     spec=lambda p, group: state_spec(opt, p, group, formats.get(opt._names[p], FULL)),
                     names=opt._names,
                     accepts="its own, another lowmem plan optimizer's under the same plan, or "
                             "torch.optim.AdamW's",
                     before_states=lambda sd: check_checkpoint_plan(opt, sd))   # the plan says why shapes differ
    params = [p for g in opt.param_groups for p in g["params"]]
    saved_state = state_dict["state"]
    _check_codes(opt, state_dict, formats)
    load_groups(opt, state_dict)   # groups and hyper-parameters only
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    for pid, p in zip(saved_ids, params):
        if saved_state.get(pid):
            state_from_checkpoint(opt, p, saved_state[pid], formats.get(opt._names[p], FULL))
    meta = state_dict.get("lowmem")
    rngs = meta.get("rounding_rng") if isinstance(meta, dict) else None
    for device, rng_state in (rngs or {}).items():   # stochastic rounding continues where it was
        if isinstance(rng_state, torch.Tensor):
            try:
                opt.rng(torch.device(device)).set_state(rng_state.cpu())
            except (RuntimeError, ValueError):
                pass   # a device this process does not have: its rounding starts from the seed


def _formats_of(opt: ReducedAdamW, state_dict: dict) -> dict[str, StateFormat]:
    """Each parameter's saved storage format: as the ``"lowmem"`` entry records it, else read
    from its saved tensors (a checkpoint that kept only ``state`` and ``param_groups``, as
    `torch.distributed.checkpoint`'s state dict helpers do): scales mean codes, whose width
    says 8 or 4 bits; bf16 tensors mean bf16."""
    formats = saved_formats(state_dict)
    try:
        params = [p for g in opt.param_groups for p in g["params"]]
        pids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved = state_dict["state"]
    except (KeyError, TypeError):
        return formats   # malformed: check_state_dict says how
    for p, pid in zip(params, pids):
        name = opt._names[p]
        entry = saved.get(pid) if isinstance(saved, dict) else None
        if name not in formats and isinstance(entry, dict):
            formats[name] = _inferred(opt, p, entry)
    return formats


def _inferred(opt: ReducedAdamW, p: torch.Tensor, entry: dict) -> StateFormat:
    length = rows_of(tuple(p.shape))[1]
    ours = opt._formats[p]

    def one(which: str) -> str:
        key = stored.KEYS[which]
        t = entry.get(key)
        if not isinstance(t, torch.Tensor):
            return "fp32"
        if stored.scale_key(which) in entry:
            width = t.shape[-1] if t.dim() else 0
            mine = ours.m if which == "m" else ours.v
            if width == length == -(-length // 2):      # rows of one entry: either; take ours
                return mine if mine in QUANTIZED else "int8"
            return "int4" if width == -(-length // 2) else "int8"
        return "bf16" if t.dtype == torch.bfloat16 else "fp32"

    try:
        return StateFormat(one("m"), one("v"))
    except ValueError as e:
        raise PlanError(f"checkpoint: the state of {opt._names[p]!r} is in no format lowmem keeps ({e})") from None


def _check_codes(opt: ReducedAdamW, state_dict: dict, formats: dict[str, StateFormat]) -> None:
    """Refuse quantized states whose codes are not uint8 or whose scales are not floating
    point, before anything is loaded."""
    params = [p for g in opt.param_groups for p in g["params"]]
    pids = [i for g in state_dict["param_groups"] for i in g["params"]]
    for p, pid in zip(params, pids):
        entry, name = state_dict["state"].get(pid) or {}, opt._names[p]
        if not entry:     # no step taken yet (accelerate reloads a fresh optimizer's state dict): nothing stored
            continue
        fmt = formats.get(name, FULL)
        for which, f in (("m", fmt.m), ("v", fmt.v)):
            if f not in QUANTIZED:
                continue
            codes, scales = entry.get(stored.KEYS[which]), entry.get(stored.scale_key(which))
            if codes.dtype != torch.uint8 or not scales.dtype.is_floating_point:
                raise ValueError(f"{type(opt).__name__}.load_state_dict: parameter {name!r}: "
                                 f"{stored.KEYS[which]!r} of format {f} must be uint8 codes with floating-point "
                                 f"scales, found {codes.dtype} and {scales.dtype}")


def saved_formats(state_dict: dict) -> dict[str, StateFormat]:
    """The storage format of each parameter a checkpoint names (``"lowmem"``/``"formats"``);
    a parameter it does not name (an AdamW checkpoint, an older lowmem one) was saved in fp32."""
    meta = state_dict.get("lowmem") if isinstance(state_dict, dict) else None
    found = meta.get("formats") if isinstance(meta, dict) else None
    if found is None:
        return {}
    try:
        return {normalize_name(str(k)): StateFormat.parse(str(v)) for k, v in dict(found).items()}
    except (TypeError, ValueError) as e:
        raise PlanError(f"checkpoint: its 'lowmem' entry has unreadable state formats ({e})") from None


def state_spec(opt: ReducedAdamW, p: torch.Tensor, group: dict, saved: StateFormat = FULL) -> StateSpec:
    """What a loaded state of `p`, saved in format `saved`, must hold: ``exp_avg`` like `p`;
    ``exp_avg_sq`` as kept here or, from an AdamW checkpoint, like `p` (global shapes for
    sharded parameters); codes and scales of quantized states in their stored shapes."""
    shape, v_shape = tuple(p.shape), opt._layouts[p].v_shape
    required, optional = {}, {"kahan_comp": (shape,)}
    for which, shapes in (("m", (shape,)), ("v", (v_shape, shape))):
        fmt = saved.m if which == "m" else saved.v
        key = stored.KEYS[which]
        if fmt in QUANTIZED:
            found = stored.stored_shapes(fmt, shape)
            required[key] = (found[""][0],)
            required[key + "_scale"] = (found["_scale"][0],)
        else:
            required[key] = shapes
    return required, optional


def check_checkpoint_plan(opt: ReducedAdamW, state_dict: dict) -> None:
    """Refuse a checkpoint whose ``"lowmem"`` entry is unreadable or names another plan."""
    if state_dict.get("lowmem") is None:   # torch's AdamW writes none
        return
    meta = state_dict["lowmem"]
    plan = meta.get("plan") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not (plan is None or isinstance(plan, dict)) or \
            not isinstance((plan or {}).get("layers") or {}, dict):
        raise PlanError(f"checkpoint: its 'lowmem' entry is unreadable ({_shorten(meta)}); expected what "
                        "state_dict() writes: {'optimizer', 'kind', 'names', 'plan': {'layers': {...}}}")
    theirs = {normalize_name(k): v for k, v in (((plan or {}).get("layers")) or {}).items()}
    ours = opt.plan.layers if opt.plan is not None else {}
    for p, name in opt._names.items():
        if theirs and name not in theirs:   # a plan covers every parameter of its model
            raise PlanError(f"checkpoint: its plan has no entry for parameter {name!r}: it was made for "
                            f"another model (its plan covers {_shorten(sorted(theirs))})")
        a = layout_of(tuple(p.shape), ours.get(name))
        try:
            lp = LayerPlan(**_layer_plan_args(theirs[name])) if name in theirs else None
            b = layout_of(tuple(p.shape), lp)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise PlanError(f"checkpoint: plan entry for {name!r} is unreadable ({e!r})") from None
        if a.blocks != b.blocks:
            raise PlanError(
                f"checkpoint was made under another plan: parameter {name!r} keeps v as "
                f"{_describe(b)} there and as {_describe(a)} here; build the optimizer from the "
                "checkpoint's plan (state_dict['lowmem']['plan']) or load an AdamW checkpoint instead")


def state_from_checkpoint(opt: ReducedAdamW, p: torch.Tensor, saved: dict, saved_fmt: StateFormat = FULL) -> None:
    """Put a checked saved state of `p` (stored in `saved_fmt`) in `opt.state`, in this
    optimizer's formats, dtypes and layout: as saved when the formats agree, else decoded,
    brought to this layout and encoded."""
    ours = opt._formats[p]
    v = saved.get("exp_avg_sq")
    kept = ours.v in QUANTIZED or v is None or tuple(v.shape) == tuple(opt._layouts[p].v_shape)
    if saved_fmt == ours and not ours.full and kept:   # (an AdamW checkpoint's bf16 v is whole: averaged below)
        out = _as_saved(opt, p, saved)
    else:
        out = _in_compute_dtype(opt, p, _decoded(opt, p, saved, saved_fmt))
        if not ours.full:
            out = _encoded(opt, p, out, ours)
    kahan = opt.keeps_kahan(p)
    if "kahan_comp" in out and not kahan:
        del out["kahan_comp"]
    elif "kahan_comp" in out:
        out["kahan_comp"] = _rows_like(opt, p, out["kahan_comp"].detach().to(
            device=local(p).device, dtype=local(p).dtype, copy=True, memory_format=torch.contiguous_format))
    elif kahan:
        out["kahan_comp"] = _rows_like(opt, p, torch.zeros_like(local(p)), local_rows=True)
    opt.state[p] = out


def _rows_like(opt: ReducedAdamW, p: torch.Tensor, t: torch.Tensor, local_rows: bool = False) -> torch.Tensor:
    """A tensor whose dim 0 is `p`'s rows, sharded like `p` when `p` is (a whole one is cut to
    this rank's rows; `local_rows`: `t` holds them already)."""
    lay = opt._sharded.get(p)
    if lay is None or is_sharded(t):
        return t
    from lowmem.compress.optim.engine import _sharded_like

    return _sharded_like(t if local_rows else t[slice(*lay.shards.rows)].contiguous(), p)


def _as_saved(opt: ReducedAdamW, p: torch.Tensor, saved: dict) -> dict:
    """A state saved in this optimizer's formats, copied as it is (sharded where `p` is),
    contiguous, and a state in format ``fp32`` in this optimizer's compute dtype."""
    lay, device, fmt = opt._sharded.get(p), local(p).device, opt._formats[p]
    compute = {stored.KEYS[w] for w, f in (("m", fmt.m), ("v", fmt.v)) if f == "fp32"}
    out = {}
    for key, value in saved.items():
        if key == "step":
            out[key] = step_tensor(value).cpu()
            continue
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        dtype = opt.state_dtype_of(p) if key in compute else value.dtype
        value = value.detach().to(device=device, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
        if key.startswith("exp_avg_sq") and lay is not None and not lay.like_param:
            out[key] = lay.take(value)   # a flat local v
        else:
            out[key] = _rows_like(opt, p, value)
    return out


def _decoded(opt: ReducedAdamW, p: torch.Tensor, saved: dict, fmt: StateFormat) -> dict:
    """A saved state with its quantized or bf16 states as compute-dtype tensors (whole ones)."""
    if fmt.full:
        return saved
    dtype, out = opt.state_dtype_of(p), dict(saved)
    for which in ("m", "v"):
        f, key = (fmt.m if which == "m" else fmt.v), stored.KEYS[which]
        whole = {k: (t.full_tensor() if is_sharded(t) else t) for k, t in saved.items()
                 if k.startswith(key) and isinstance(t, torch.Tensor)}
        shape = tuple(p.shape) if f in QUANTIZED else tuple(whole[key].shape)
        out[key] = stored.decode(which, f, whole, shape, dtype)
        out.pop(key + "_scale", None)
    return out


def _encoded(opt: ReducedAdamW, p: torch.Tensor, state: dict, fmt: StateFormat) -> dict:
    """A state in the compute dtype and this optimizer's layout, encoded in `fmt`."""
    out = {k: v for k, v in state.items() if not k.startswith("exp_avg")}
    lay = opt._sharded.get(p)
    for which in ("m", "v"):
        f, key = (fmt.m if which == "m" else fmt.v), stored.KEYS[which]
        x = local(state[key])
        tensors = stored.allocate(which, f, tuple(x.shape), x.dtype, x.device)
        stored.encode_(which, f, x, tensors)
        if lay is not None and (which == "m" or lay.like_param):
            tensors = {k: _rows_like(opt, p, t, local_rows=True) for k, t in tensors.items()}
        out.update(tensors)
    return out


def _in_compute_dtype(opt: ReducedAdamW, p: torch.Tensor, saved: dict) -> dict:
    """A state saved in fp32 (or decoded to it) in this optimizer's compute dtype and layout."""
    layout, name = opt._layouts[p], opt._names[p]
    dtype = opt.state_dtype_of(p)
    out = {}
    for key, value in saved.items():
        if key == "step":
            out[key] = step_tensor(value).cpu()
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().to(device=p.device, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
        else:
            out[key] = value
    v = out.get("exp_avg_sq")
    lay = opt._sharded.get(p)
    if lay is not None:
        for key in ("exp_avg", "exp_avg_sq"):   # a single-process checkpoint: this rank's rows
            t = out.get(key)
            if t is not None and not is_sharded(t) and tuple(t.shape) == tuple(p.shape) and \
                    (key == "exp_avg" or lay.like_param):
                out[key] = _shard_like(t, p, lay.shards)
        v = None if lay.like_param else out.get("exp_avg_sq")
    if v is not None and lay is not None:
        if tuple(v.shape) == tuple(p.shape) and is_sharded(v):   # a sharded AdamW v: average it per plan
            shard = v.to_local()
            means = sharded_means([(lay, shard)], square=False)[0]
            out["exp_avg_sq"] = torch.cat([sb.entries(shard).reshape(-1) if m is None else m
                                           for sb, m in zip(lay.blocks, means)])
        elif tuple(v.shape) == tuple(p.shape) and layout.compressed:   # a single-process AdamW v
            out["exp_avg_sq"] = lay.take(reduce_v(v, layout))
        elif tuple(v.shape) == layout.v_shape:
            out["exp_avg_sq"] = lay.take(v)
        else:
            raise PlanError(f"checkpoint: exp_avg_sq of {name!r} has shape {tuple(v.shape)}, expected "
                            f"{layout.v_shape} (or the parameter's shape {tuple(p.shape)} for an AdamW checkpoint)")
    elif v is not None and tuple(v.shape) != layout.v_shape:
        if tuple(v.shape) == tuple(p.shape) and layout.compressed:
            out["exp_avg_sq"] = reduce_v(v, layout)   # a full AdamW v: average it per plan
        else:
            raise PlanError(f"checkpoint: exp_avg_sq of {name!r} has shape {tuple(v.shape)}, expected "
                            f"{layout.v_shape} (or the parameter's shape {tuple(p.shape)} for an AdamW checkpoint)")
    for k in ("max_exp_avg_sq",):   # AMSGrad state has no meaning here
        out.pop(k, None)
    return out


def adamw_state_dict(opt: ReducedAdamW) -> dict:
    """`ReducedAdamW.adamw_state_dict`: this optimizer's state as `torch.optim.AdamW` keeps it."""
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    formats = saved_formats(sd)
    for i, p in enumerate(params):
        st = sd["state"].get(i)
        if not st:
            continue
        dense = _decoded(opt, p, st, formats.get(opt._names[p], FULL))
        m, v = dense["exp_avg"], dense["exp_avg_sq"]
        m = m.full_tensor() if is_sharded(m) else m
        v = v.full_tensor() if is_sharded(v) else v
        sd["state"][i] = {"step": st["step"], "exp_avg": m.to(p.dtype), "exp_avg_sq": _expand_v(opt._layouts[p], v, tuple(p.shape)).to(p.dtype)}
    for g in sd["param_groups"]:
        for k in ("foreach", "compiled", "backend", "param_rounding"):
            g.pop(k, None)
        g.update(amsgrad=False, capturable=False, differentiable=False, fused=None, foreach=None)
    del sd["lowmem"]
    return sd


def _expand_v(layout: Layout, v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A kept `v` (this layout's ``exp_avg_sq``) spread over the parameter's `shape`: each kept
    entry fills the entries it was averaged over."""
    full = torch.empty(shape, dtype=v.dtype, device=v.device)
    for i, block in enumerate(layout.blocks):
        target = block.narrow(full)
        target.copy_(layout.v_of(v, i).expand(block.view).reshape(target.shape))
    return full


def _shard_like(t: torch.Tensor, p: torch.Tensor, shards: RowShards) -> torch.Tensor:
    """A whole parameter-shaped tensor as a DTensor sharded like `p` (this rank's rows of it)."""
    from torch.distributed.tensor import DTensor

    rows = t[slice(*shards.rows)].contiguous()
    return DTensor.from_local(rows, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _layer_plan_args(d: dict) -> dict:
    parts = [PartPlan(p["name"], p["dim"], p["start"], p["stop"], p["view"], p["reduce"]) for p in d["parts"]] \
        if d.get("parts") else None
    return dict(shape=d["shape"], role=d.get("role", "other"), view=d["view"], reduce=d["reduce"], parts=parts)


def _shorten(x: Any, n: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= n else text[:n - 3] + "..."


def _describe(layout: Layout) -> str:
    def one(b: Block) -> str:
        where = "" if b.dim is None else f"[{b.start}:{b.stop}] " if b.source is None else \
            f"{list(b.source)}[dim {b.dim}: {b.start}:{b.stop}] "
        return f"{where}view {list(b.view)} reduce {None if b.reduce is None else list(b.reduce)}"
    return "; ".join(one(b) for b in layout.blocks)

