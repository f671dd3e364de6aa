"""What each parameter of a model *is*: its role, the meaning of each axis, heads, tied names.

Names are resolved here, once. Everything downstream (SNR views, plans, optimizers) reads the
`ParamInfo` records and never parses parameter names itself.

Axis names (DESIGN §2): ``out`` / ``in`` (fan_out / fan_in of a matrix or conv), ``token``
(vocabulary or position rows of an embedding), ``model`` (the hidden width of an embedding or a
norm), ``kh`` / ``kw`` / ``kd`` (kernel dims of a conv), ``expert`` (the experts of a
mixture-of-experts stack: one (out, in) matrix each, never averaged over). In head-split views
``head`` is the head index and ``part`` the q/k/v part of a fused projection. Axes the resolver
cannot name are ``d0``, ``d1``, …: nothing averages over them but a measurement (the SNR plan).

Mixture-of-experts blocks are found from structure, with names as hints: a module holding a
stack of experts (a 3-D parameter whose first dim is the experts count that the module, an
ancestor or the config gives, or a ``ModuleList`` of experts) is an MoE block; in a stack, the
axis of the hidden width (from the module, an ancestor or the config) is ``in`` of the first
projection (``gate_up_proj``, ``w1``, ``up_proj``, …) and ``out`` of the last (``down_proj``,
``w2``, …), so both layouts in use, (expert, out, in) as `F.linear` reads it and (expert, in,
out) as `torch.bmm` does, are read right; a stack whose axes cannot be told apart keeps
generic axes. DBRX's 2-D stacks (experts·rows, hidden) are read as (experts, rows, hidden):
`ParamInfo.view`. The block's gating projections (one output per expert, or one for a shared
expert) are ``router``.

Other families are read from structure where their names mislead or say nothing: a state-space
mixer (a module holding ``A_log``) has an MLP's pair of projections, not attention; multi-head
latent attention (``kv_lora_rank``) has its queries and its per-head keys and values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

ROLES = (
    "embedding", "lm_head", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out",
    "mlp_up", "mlp_gate", "mlp_down", "router", "norm", "bias", "conv", "other",
)

# Last name component of a Linear-like weight -> role. Context (the parent's name) decides
# the ambiguous ones (nanoGPT's `c_proj`, BERT's `dense`) in `_linear_role`.
_Q_NAMES = {"q", "q_proj", "query", "wq", "to_q", "q_lin"}
_K_NAMES = {"k", "k_proj", "key", "wk", "to_k", "k_lin"}
_V_NAMES = {"v", "v_proj", "value", "wv", "to_v", "v_lin"}
_QKV_NAMES = {"c_attn", "qkv", "wqkv", "qkv_proj", "in_proj", "query_key_value", "to_qkv"}
# fused projections whose q, k, v layout differs between codebases: only a config can say which
# (query_key_value: per head in GPT-NeoX, BLOOM and Megatron, one after the other in ChatGLM;
# wqkv: per key-value group in InternLM2, one after the other in MPT)
_QKV_AMBIGUOUS = {"query_key_value", "wqkv"}
_OUT_NAMES = {"o_proj", "out_proj", "wo", "to_out", "o", "out_lin", "attn_out", "output_proj"}
# Meta's Llama/Mixtral: w2(silu(w1 x) * w3 x), so w1 is the gate and w3 the up projection.
# A fused gate and up projection (Phi-3's `gate_up_proj`) is an up projection: every preset and
# rule treats gate and up alike. GPT-NeoX / Falcon: dense_h_to_4h, dense_4h_to_h; SlimAdam's
# reference code: mlp_up, mlp_proj / mlp_down (and output_proj for the attention's output).
_UP_NAMES = {"c_fc", "fc1", "up_proj", "w3", "fc_in", "lin1", "wi", "wi_1", "gate_up_proj", "dense_h_to_4h", "mlp_up"}
_GATE_NAMES = {"gate_proj", "gate", "w1", "wi_0"}
_DOWN_NAMES = {"fc2", "down_proj", "w2", "fc_out", "lin2", "wo_mlp", "dense_4h_to_h", "mlp_down", "mlp_proj"}
_HEAD_NAMES = {"lm_head", "head", "classifier", "output", "embed_out", "score"}
_ATTN_CONTEXT = ("attn", "attention", "self_attn", "mixer")
_MLP_CONTEXT = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "densereludense")

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
               nn.modules.batchnorm._NormBase)
_HEAD_ATTRS = ("n_head", "num_heads", "num_attention_heads", "n_heads", "nheads", "heads")
_EXPERT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                 "n_experts", "num_experts_total")
# The model's width by the attribute names that hold it; ``hidden_dim`` last: Meta's and torchtitan's
# code name the FFN's width so (beside ``dim``), where transformers' Mixtral names the model's.
_HIDDEN_ATTRS = ("hidden_size", "d_model", "n_embd", "embed_dim", "model_dim", "dim", "hidden_dim")
# An expert stack's projections by the last component of their name: the first ones read the
# hidden state (a fused gate+up is an up projection: every preset and rule treats gate and up
# alike), the last one writes it.
_EXPERT_UP = {"gate_up_proj", "gate_up", "w13", "w1_w3", "up_proj", "w3", "fc1", "wi", "w_in", "linear_fc1",
              "experts_up", "up", "v1"}
_EXPERT_GATE = {"gate_proj", "w1"}
_EXPERT_DOWN = {"down_proj", "w2", "fc2", "wo", "w_out", "linear_fc2", "experts_down", "down"}
# Names a router goes by (its module's or its own); structure decides: one output per expert of
# its MoE block, or a single one (a shared expert's gate).
_ROUTER_NAMES = {"gate", "router", "gating", "wg", "shared_expert_gate", "moe_gate", "gate_network", "classifier"}
_KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head", "kv_heads")


@dataclass(frozen=True)
class ParamInfo:
    """One parameter (once, however many names it has) and what its axes mean.

    Attributes:
        name: canonical name (the first name `named_parameters` yields).
        names: every name of the parameter, canonical first (tied weights have several); the
            other names alone are `aliases`.
        shape: the tensor's shape.
        role: one of `ROLES`.
        axes: the meaning of each dim, e.g. ``("out", "in")`` or, for HF `Conv1D`, ``("in", "out")``.
        module: class name of the owning module.
        heads: number of heads of this projection's output (Q: query heads; K/V: key-value heads).
        head_dim: width of one head.
        parts: for a fused projection, ``(("q", size), ("k", size), ("v", size))`` along the
            ``out`` axis, each with its own head count in `part_heads`; with `part_groups`, the
            sizes within each group of rows.
        part_groups: for a fused projection whose q, k and v rows are interleaved, the number of
            groups of rows that each hold one slice of every part, in order: the heads of a per-head
            layout (GPT-NeoX: each head's q, k, v rows), the key-value groups of a grouped one
            (Falcon's new architecture: a group's query heads, then its key, then its value). The
            ``out`` axis is read as (groups, rows per group) and the parts slice the second
            (`part_source`); None where the parts lie one after the other.
        is_bias: the tensor is a module's additive bias (``bias``, ``in_proj_bias``), whatever its
            role: a norm's bias has role ``norm``, and presets may treat it apart from the weight.
        qkv_layout: for a fused Q/K/V projection, how its ``out`` axis holds q, k and v:
            ``"contiguous"`` (all q rows, then k, then v), ``"per_head"`` (q, k, v rows of each
            head together: GPT-NeoX, BLOOM), ``"grouped"`` (per key-value group: Falcon's new
            architecture), all three split into `parts` where the heads are known, or
            ``"unknown"`` (a library model whose layout lowmem has not verified): kept whole.
        found: how the role was found, in words: ``name c_fc``, ``module type LayerNorm``,
            ``structure: …`` (what in the module graph or shapes decided it), ``given`` (the
            caller's `roles`), or why it is ``other``. Plans say it in their ``why``.
        view: the shape the tensor is read as when `axes` name the dims of a reshape of it, not
            its own: DBRX's experts, a 2-D (experts·rows, cols) stack read as (experts, rows,
            cols). None (the default) where `axes` name the tensor's own dims. Every consumer
            that reads `axes` reads them on `view_shape`.
    """

    name: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    role: str
    axes: tuple[str, ...]
    module: str
    heads: int | None = None
    head_dim: int | None = None
    parts: tuple[tuple[str, int], ...] | None = None
    part_heads: tuple[int, ...] | None = None
    is_bias: bool = False
    qkv_layout: str | None = None
    found: str = ""
    part_groups: int | None = None
    view: tuple[int, ...] | None = None

    @property
    def view_shape(self) -> tuple[int, ...]:
        """The shape whose dims `axes` name: `view` where there is one, else the tensor's shape."""
        return tuple(self.view) if self.view is not None else tuple(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def aliases(self) -> tuple[str, ...]:
        """The other names of a tied parameter (empty when it has one name), as a plan's ``aliases``."""
        return self.names[1:]

    @property
    def tied(self) -> bool:
        return len(self.names) > 1

    def dims(self, *axis_names: str) -> tuple[int, ...]:
        """Dims of `view_shape` (the tensor itself where there is no `view`) whose axis name is one
        of `axis_names`."""
        return tuple(i for i, a in enumerate(self.axes) if a in axis_names)

    @property
    def fan_in_dims(self) -> tuple[int, ...]:
        return self.dims("in", "kh", "kw", "kd")

    @property
    def fan_out_dims(self) -> tuple[int, ...]:
        return self.dims("out")

    @property
    def part_source(self) -> tuple[int, ...] | None:
        """The shape the parts slice when they are interleaved: the ``out`` axis as (groups, rows
        per group), the other axes as they are; None where the parts slice the tensor itself."""
        if not self.parts or not self.part_groups:
            return None
        d, shape = self.axes.index("out"), self.view_shape
        g = self.part_groups
        return (*shape[:d], g, shape[d] // g, *shape[d + 1:])

    @property
    def part_dim(self) -> int:
        """The dim that the parts slice: of `part_source` where there is one, else of the tensor."""
        d = self.axes.index("out")
        return d + 1 if self.part_source is not None else d


@dataclass
class ModelLayers:
    """All parameters of a model, resolved; iterate it for `ParamInfo` records in model order."""

    params: dict[str, ParamInfo]
    unknown: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.params.values())

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, name: str) -> ParamInfo:
        return self.params[normalize_name(name)] if normalize_name(name) in self.params \
            else self.params[self._alias_index()[normalize_name(name)]]

    def _alias_index(self) -> dict[str, str]:
        return {n: p.name for p in self.params.values() for n in p.names}

    def to_json(self) -> dict:
        """``{"schema": "lowmem.layers/1", "params": [...], "unknown": [...]}``: every `ParamInfo`
        field, so a report can be rebuilt from a run folder without importing the model."""
        return {"schema": LAYERS_SCHEMA, "params": [_info_json(p) for p in self.params.values()],
                "unknown": list(self.unknown)}

    @classmethod
    def from_json(cls, doc: dict) -> "ModelLayers":
        """Inverse of `to_json`; raises ValueError on another schema or a malformed record.

        A record may give the names as ``"aliases"`` (every name, canonical first), as files
        written before the key was ``"names"`` do, and may lack ``"is_bias"`` (it is then read
        from the canonical name, as `resolve_layers` does).
        """
        if not isinstance(doc, dict) or doc.get("schema") != LAYERS_SCHEMA:
            found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"expected schema {LAYERS_SCHEMA!r}, found {found!r}")
        try:
            infos = [ParamInfo(
                name=r["name"], names=tuple(r["names"] if "names" in r else r["aliases"]), shape=tuple(int(s) for s in r["shape"]),
                role=r["role"], axes=tuple(r["axes"]), module=r["module"], heads=r.get("heads"),
                head_dim=r.get("head_dim"),
                parts=None if r.get("parts") is None else tuple((str(n), int(s)) for n, s in r["parts"]),
                part_heads=None if r.get("part_heads") is None else tuple(r["part_heads"]),
                is_bias=bool(r["is_bias"]) if "is_bias" in r else _is_bias(r["name"].rpartition(".")[2]),
                qkv_layout=r.get("qkv_layout"), found=str(r.get("found") or ""), part_groups=None if r.get("part_groups") is None else int(r["part_groups"]),
                view=None if r.get("view") is None else tuple(int(s) for s in r["view"]))
                for r in doc["params"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed parameter record: {e!r}") from None
        return cls({i.name: i for i in infos}, list(doc.get("unknown", [])))


LAYERS_SCHEMA = "lowmem.layers/1"


def _info_json(p: ParamInfo) -> dict:
    return {"name": p.name, "names": list(p.names), "shape": list(p.shape), "role": p.role,
            "axes": list(p.axes), "module": p.module, "heads": p.heads, "head_dim": p.head_dim,
            "parts": None if p.parts is None else [list(x) for x in p.parts],
            "part_heads": None if p.part_heads is None else list(p.part_heads), "is_bias": p.is_bias,
            "qkv_layout": p.qkv_layout, "found": p.found, "part_groups": p.part_groups,
            "view": None if p.view is None else list(p.view)}


_PREFIXES = ("_orig_mod.", "module.")


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (FSDP2, tensor parallel): it has placements over a device mesh."""
    return getattr(t, "placements", None) is not None


def normalize_name(name: str) -> str:
    """Strip the wrappers' prefixes (`torch.compile`'s ``_orig_mod.``, DDP's ``module.``)."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
            name2 = name.replace("." + prefix, ".")
            if name2 != name:
                name, changed = name2, True
    return name


def resolve_layers(
    model: nn.Module,
    heads: int | None = None,
    kv_heads: int | None = None,
    roles: dict[str, str] | None = None,
    warn: bool = True,
) -> ModelLayers:
    """Resolve role, axes, heads and tied names for every trainable parameter of `model`.

    Args:
        model: any `nn.Module` (wrapped by `torch.compile` or DDP is fine).
        heads: attention heads, overriding what the modules / config say.
        kv_heads: key-value heads (GQA), overriding what the modules / config say.
        roles: explicit roles by (normalised) parameter name, overriding the resolver.
        warn: issue one warning listing the parameters that fell back to role ``other``.

    Returns:
        `ModelLayers`, parameters in `named_parameters` order, names normalised.
    """
    roles = {normalize_name(k): v for k, v in (roles or {}).items()}
    for name, role in roles.items():
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} for {name!r}; expected one of {', '.join(ROLES)}")
    # A wrapper's path and its wrapped module's path normalise to the same key (the trailing dot
    # lets a final `._orig_mod` / `.module` be stripped); the wrapped module comes later in
    # `named_modules` and wins, so a compiled `nn.Linear` is still seen as a Linear.
    modules = {normalize_name(k + ".")[:-1]: m for k, m in model.named_modules(remove_duplicate=False)}
    config = getattr(model, "config", None)

    names_by_param: dict[int, list[str]] = {}
    param_by_id: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(p), []).append(normalize_name(name))
        param_by_id[id(p)] = p

    moe = _moe_blocks(modules, names_by_param, param_by_id, config)
    params: dict[str, ParamInfo] = {}
    unknown: list[str] = []
    for pid, names in names_by_param.items():
        p = param_by_id[pid]
        if not p.requires_grad:
            continue
        names = list(dict.fromkeys(names))
        infos = [_resolve_one(n, p, modules, config, heads, kv_heads, moe) for n in names]
        # A tied weight takes the role of its most specific name (embedding beats lm_head).
        info = min(infos, key=lambda i: _ROLE_PRIORITY.get(i.role, 99))
        info = ParamInfo(**{**info.__dict__, "name": names[0], "names": tuple(names)})
        if names[0] in roles or any(n in roles for n in names):
            forced = next(roles[n] for n in names if n in roles)
            info = _with_role(info, forced, heads, kv_heads)
        elif info.role == "other" and _is_last_layer(info, modules):
            info = _with_role(info, "lm_head", heads, kv_heads, "structure: an output layer of the model (after "
                              "and outside the repeated blocks, fed by another layer; no layer reads its output "
                              "width)")
        if info.role == "other":
            unknown.append(info.name)
        params[info.name] = info
    if unknown and warn:
        warnings.warn(
            f"lowmem: {len(unknown)} parameter(s) of unknown layer types get role 'other' (full Adam in every "
            f"preset; an SNR plan may average one along its known axes): "
            f"{', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}",
            stacklevel=2,
        )
    return ModelLayers(params, unknown)


_ROLE_PRIORITY = {"embedding": 0, "lm_head": 1}


def _owner(name: str, modules: dict[str, nn.Module]) -> tuple[str, str, nn.Module | None, list[nn.Module]]:
    """(module path, attribute, owning module, ancestors nearest first) of a parameter name."""
    path, _, attr = name.rpartition(".")
    owner = modules.get(path)
    ancestors = []
    parts = path.split(".") if path else []
    for i in range(len(parts) - 1, -1, -1):
        m = modules.get(".".join(parts[:i]))
        if m is not None:
            ancestors.append(m)
    return path, attr, owner, ancestors


def _experts_count(modules_chain, config) -> int | None:
    return _chain_attr(modules_chain, config, _EXPERT_ATTRS)


def _moe_blocks(modules: dict[str, nn.Module], names_by_param: dict, param_by_id: dict, config) -> dict[str, int]:
    """``MoE block path -> experts count``: the block around every module that holds a stack of
    experts (a 3-D parameter whose first dim is the experts count its module, an ancestor or the
    config gives, or, without a count, held by a module named like ``experts``; a 2-D one,
    `_flat_stack`) or that is a ``ModuleList`` or ``ModuleDict`` of experts (named like
    ``experts``, as many as the count where one is given: Switch Transformers and NLLB-MoE key
    theirs ``expert_0``, …). The block of a stack is the parent of the nearest module on its path
    named like ``experts`` (DBRX: ``ffn`` of ``ffn.experts.mlp.w1``), else of its holder."""
    blocks: dict[str, int] = {}
    for pid, names in names_by_param.items():
        p = param_by_id[pid]
        if p.dim() not in (2, 3):
            continue
        path, _, attr = normalize_name(names[0]).rpartition(".")
        chain = _chain(path, modules)
        count = _experts_count(chain, config)
        if p.dim() == 2:
            flat = _flat_stack(attr, tuple(p.shape), chain, config)
            if flat is not None:
                blocks[_stack_block(path)] = flat[0]
        elif count == p.shape[0] or (count is None and "expert" in path.rpartition(".")[2].lower()):
            blocks[_stack_block(path)] = int(p.shape[0])
    for path, m in modules.items():
        leaf = path.rpartition(".")[2].lower()
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and len(m) > 1 and "expert" in leaf and "shared" not in leaf:
            count = _experts_count(_chain(path, modules), config)
            if count is None or count == len(m):
                blocks.setdefault(path.rpartition(".")[0], len(m))
    return blocks


def _stack_block(holder: str) -> str:
    """The MoE block of a stack of experts held by the module at `holder`: the parent of the
    nearest module on the path named like ``experts``, else the holder's parent."""
    parts = holder.split(".") if holder else []
    for i in range(len(parts) - 1, -1, -1):
        if "expert" in parts[i].lower():
            return ".".join(parts[:i])
    return holder.rpartition(".")[0]


def _flat_stack(attr: str, shape: tuple[int, ...], chain: list, config) -> tuple[int, int, int] | None:
    """(experts, rows, cols): the view of a 2-D raw parameter that stacks experts' matrices along
    its rows, (experts·rows, cols), as DBRX's ``w1``, ``v1`` and ``w2`` do; else None. It is one
    where its holder is no layer of its own (not a Linear, embedding or conv), its name is an
    expert projection's, its holder or the holder's parent itself (not a model-wide config: a
    dense layer of an MoE model is no stack) gives an experts count E > 1 that divides its rows
    into runs longer than one, and its columns are the hidden width."""
    owner = chain[0] if chain else None
    if len(shape) != 2 or owner is None or _expert_role(attr) is None or _linear_shape(owner) is not None \
            or isinstance(owner, (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd)):
        return None
    experts, hidden = _find_attr(chain[:2], _EXPERT_ATTRS), _chain_attr(chain, config, _HIDDEN_ATTRS)
    if not experts or experts < 2 or shape[0] % experts or shape[0] == experts or shape[1] != hidden:
        return None
    return experts, shape[0] // experts, shape[1]


def _block_path(path: str, blocks: dict[str, int]) -> str | None:
    """The path of the MoE block that `path` (a module path) lies in, or None."""
    while path:
        if path in blocks:
            return path
        path = path.rpartition(".")[0]
    return "" if "" in blocks else None


def _chain(path: str, modules: dict[str, nn.Module]) -> list[nn.Module]:
    """The module at `path` and its ancestors, nearest first."""
    parts = path.split(".") if path else []
    out = []
    for i in range(len(parts), -1, -1):
        m = modules.get(".".join(parts[:i]))
        if m is not None:
            out.append(m)
    return out


def _in_block(path: str, blocks: dict[str, int]) -> int | None:
    """The experts count of the MoE block that `path` (a module path) lies in, or None."""
    while path:
        if path in blocks:
            return blocks[path]
        path = path.rpartition(".")[0]
    return blocks.get("")


def _expert_role(attr: str) -> str | None:
    a = attr.lower()
    return "mlp_down" if a in _EXPERT_DOWN else "mlp_gate" if a in _EXPERT_GATE else \
        "mlp_up" if a in _EXPERT_UP else None


def _stack_convention(owner, experts: int, hidden: int) -> str | None:
    """How the expert stacks of `owner` lay out their matrices, from those whose hidden-width axis
    shows it: ``"linear"`` (expert, out, in), as `F.linear` reads them, or ``"bmm"`` (expert, in,
    out); None where they show none or disagree. A 2-D stack (experts·rows, cols) is read as
    (experts, rows, cols)."""
    seen = set()
    for name, p in owner.named_parameters(recurse=False) if owner is not None else ():
        role = _expert_role(name)
        shape = tuple(p.shape) if p.dim() == 3 else (experts, p.shape[0] // experts, p.shape[1]) \
            if p.dim() == 2 and p.shape[0] % experts == 0 else None
        if shape is None or shape[0] != experts or role is None or (shape[1] == hidden) == (shape[2] == hidden):
            continue
        reads_hidden = role != "mlp_down"
        seen.add("linear" if (shape[2] == hidden) == reads_hidden else "bmm")
    return seen.pop() if len(seen) == 1 else None


def _expert_info(info, attr: str, shape, chain, config, flat: bool = False) -> ParamInfo:
    """A stack of expert matrices (expert, ·, ·): role by name, the hidden width's axis decides
    which of the two is ``in`` (first projections) or ``out`` (the last); a square stack follows
    its siblings' layout (gpt-oss, where the model's and the FFN's widths are equal). `flat`: the
    tensor is 2-D, (experts·rows, cols), and `shape` its view (experts, rows, cols), which the
    axes name (`ParamInfo.view`)."""
    role = _expert_role(attr)
    hidden = _chain_attr(chain, config, _HIDDEN_ATTRS)
    stack = f"structure: a stack of {shape[0]} experts' matrices"
    if flat:
        stack += f", ({shape[0]}·{shape[1]}, {shape[2]}) read as ({shape[0]}, {shape[1]}, {shape[2]})"
        plain = info
        info = lambda role, axes, found: plain(role, axes, found, view=tuple(shape))   # noqa: E731
    if role is None or hidden is None or (shape[1] == hidden) == (shape[2] == hidden):
        convention = _stack_convention(chain[0], shape[0], hidden) if role is not None and \
            shape[1] == shape[2] == hidden else None
        if convention is not None:   # square: laid out as its siblings are
            return info(role, ("expert", "out", "in") if convention == "linear" else ("expert", "in", "out"),
                        f"{stack}, name {attr}; square: laid out as its siblings, "
                        f"{'(expert, out, in)' if convention == 'linear' else '(expert, in, out)'}")
        why = "name unknown" if role is None else "hidden width unknown" if hidden is None else \
            f"neither or both of its axes are the hidden width {hidden}"
        return info("other", ("expert", "d1", "d2"), f"{stack}; {why}: which axis is which is not known")
    hidden_axis = "out" if role == "mlp_down" else "in"
    other = "in" if hidden_axis == "out" else "out"
    return info(role, ("expert", hidden_axis, other) if shape[1] == hidden else ("expert", other, hidden_axis),
                f"{stack}, name {attr}; its axis of the hidden width {hidden} is {hidden_axis}")


def _router_info(info, attr: str, below: list[str], shape, experts: int, is_linear: bool, axes) -> ParamInfo | None:
    """A gating projection of an MoE block (one output per expert, or one: a shared expert's
    gate), or None. `below`: the components of its module's path inside the block (DBRX's
    ``router.layer``: a router's own Linear)."""
    named = next((c for c in reversed(below) if c in _ROUTER_NAMES or "router" in c), None) or \
        (attr if attr.lower() in _ROUTER_NAMES else None)
    if len(shape) != 2 or named is None:
        return None
    found = f"structure: in an MoE block of {experts} experts, named {named}, " \
            f"one output per expert (or one: a shared expert's gate)"
    if is_linear:
        out = shape[axes.index("out")]
        return info("router", axes, found) if out in (experts, 1) else None
    if shape[0] in (experts, 1) and shape[1] not in (experts, 1):
        return info("router", ("out", "in"), found)   # a raw weight read as F.linear(x, weight)
    if shape[1] in (experts, 1) and shape[0] not in (experts, 1):
        return info("router", ("in", "out"), found)
    return None


def _resolve_one(name, p, modules, config, heads, kv_heads, moe=None) -> ParamInfo:
    path, attr, owner, ancestors = _owner(name, modules)
    shape = tuple(p.shape)
    mod_name = type(owner).__name__ if owner is not None else "?"
    last = path.rpartition(".")[2].lower()
    context = path.lower()
    base = dict(name=name, names=(name,), shape=shape, module=mod_name, is_bias=_is_bias(attr))

    def info(role, axes, found=None, **kw):
        return ParamInfo(**base, role=role, axes=tuple(axes), found=found or by_type, **kw)

    by_type = f"module type {mod_name}"
    if owner is None:
        return info("other", _generic_axes(shape), "no module holds it by this name")

    # Vectors: norms, biases, and everything one-dimensional.
    if isinstance(owner, _NORM_TYPES) or _is_rmsnorm(owner):
        return info("norm", ["model"] * len(shape))
    experts = _in_block(path, moe or {})
    block = _block_path(path, moe or {}) if experts is not None else None
    if _is_bias(attr) or (p.dim() == 1 and attr != "weight"):
        if p.dim() == 1:
            return info("bias", ["out"], f"name {attr}" if _is_bias(attr) else "shape: one-dimensional")
        if p.dim() == 2 and experts is not None and shape[0] == experts:
            return info("bias", ["expert", "out"], f"structure: one {attr} per expert of an MoE block of {experts}")
        return info("other", _generic_axes(shape), f"a {attr} of {p.dim()} dims: axes unknown")

    if isinstance(owner, nn.Embedding) or isinstance(owner, nn.EmbeddingBag):
        if any(h in last for h in _HEAD_TABLES):   # T5's relative position buckets × heads
            return info("embedding", ["token", "head"], f"module type {mod_name}, name {last} (a table of heads)")
        return info("embedding", ["token", "model"])
    if p.dim() == 2 and not isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) and \
            any(h in attr.lower() for h in _HEAD_TABLES):
        # Swin's, BEiT's relative_position_bias_table: (relative positions, heads), a raw parameter
        hq, _ = _heads(owner, ancestors, config, heads, kv_heads)
        if not isinstance(hq, int) or shape[1] == hq:
            return info("embedding", ["token", "head"],
                        f"name {attr} (a table of relative positions by heads{'' if isinstance(hq, int) else ', heads unknown'})")
    if _is_raw_embedding(attr, owner) and p.dim() >= 2:
        # ViT's position embeddings and class token, (1, tokens, width): a table of token rows
        return info("embedding", ["token"] * (p.dim() - 1) + ["model"], f"name {attr}")

    if experts is not None:
        is_conv1d = type(owner).__name__ == "Conv1D" and p.dim() == 2
        is_linear = isinstance(owner, nn.Linear) or is_conv1d
        below = [c.lower() for c in path[len(block):].split(".") if c]
        router = _router_info(info, attr, below, shape, experts, is_linear,
                              (("in", "out") if is_conv1d else ("out", "in")))
        if router is not None:
            return router
        if p.dim() == 3 and shape[0] == experts and not isinstance(owner, nn.modules.conv._ConvNd):
            return _expert_info(info, attr, shape, [owner, *ancestors], config)
        flat = _flat_stack(attr, shape, [owner, *ancestors], config) if p.dim() == 2 else None
        if flat is not None:
            return _expert_info(info, attr, flat, [owner, *ancestors], config, flat=True)

    if isinstance(owner, nn.MultiheadAttention) and attr == "in_proj_weight":
        h = heads or owner.num_heads
        d = owner.embed_dim
        return _qkv_info(info, ("out", "in"), shape[0], (d, d, d), h, h, "contiguous", by_type)
    if isinstance(owner, nn.MultiheadAttention) and attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        role = {"q": "attn_q", "k": "attn_k", "v": "attn_v"}[attr[0]]
        h = heads or owner.num_heads
        return info(role, ["out", "in"], heads=h, head_dim=shape[0] // h)

    is_conv1d_hf = type(owner).__name__ == "Conv1D" and p.dim() == 2
    if isinstance(owner, nn.Linear) or is_conv1d_hf:
        axes = ("in", "out") if is_conv1d_hf else ("out", "in")
        out_features = shape[axes.index("out")]
        parent = modules.get(path.rpartition(".")[0]) if "." in path else modules.get("")
        if _is_ssm_mixer(parent):   # Mamba's in_proj / out_proj are no attention, whatever their names
            return _ssm_info(info, axes, shape, [owner, *ancestors], config, last)
        lone_square = out_features == shape[axes.index("in")] and parent is not None and \
            sum(_linear_shape(m) is not None for m in parent.children()) == 1
        role = _linear_role(last, context, attr, lone_square=lone_square)
        found = f"name {last}" if role != "other" else None
        if role == "other" and p.dim() == 2:
            mla = _mla_info(info, axes, shape, parent, config, last)
            if mla is not None:
                return mla
            role, found = _pair_role(path, owner, modules)
        if role == "other" and p.dim() == 2:
            # A Linear with a name we do not know is still a Linear: its axes are known, its role is not.
            return info("other", axes, f"a {mod_name} whose name ({last}) and siblings say nothing of its role")
        if role == "attn_qkv":
            hq, hkv = _heads(owner, ancestors, config, heads, kv_heads)
            in_features = shape[axes.index("in")]
            cfg = _model_config([owner, *ancestors], config)
            if getattr(cfg, "model_type", None) == "falcon" and getattr(cfg, "multi_query", False) and \
                    not getattr(cfg, "new_decoder_architecture", False):
                hkv = 1   # Falcon's multi-query: one key and one value head, whatever num_kv_heads says
            layout = _qkv_layout(cfg, out_features, in_features, hq, hkv, last)
            if layout == "unknown" and last in _QKV_AMBIGUOUS and not isinstance(getattr(cfg, "model_type", None), str):
                found = (f"{found}; codebases lay out its q, k and v rows differently (GPT-NeoX and Megatron "
                         f"per head, InternLM2 per key-value group, ChatGLM and MPT one after the other) and no "
                         f"transformers config says which: kept whole")
            if layout == "grouped" and hkv == 1:   # one key-value group: q, k, v one after the other
                layout = "contiguous"
            if layout in ("per_head", "grouped"):
                return _interleaved_info(info, axes, out_features, in_features, hq, hkv, layout, found,
                                         is_sharded(p))
            return _qkv_info(info, axes, out_features, None, hq, hkv, layout, found)
        if role in ("attn_q", "attn_k", "attn_v"):
            hq, hkv = _heads(owner, ancestors, config, heads, kv_heads)
            h = hq if role == "attn_q" else hkv
            if h and out_features % h == 0:
                return info(role, axes, found, heads=h, head_dim=out_features // h)
            return info(role, axes, found)
        return info(role, axes, found)

    if isinstance(owner, nn.modules.conv._ConvNd):
        k = p.dim() - 2
        kernel_axes = {1: ["kw"], 2: ["kh", "kw"], 3: ["kd", "kh", "kw"]}[k]
        # `transposed`, not `_ConvTransposeMixin`: the mixin is no longer a base of ConvTransposeNd.
        if owner.transposed:
            return info("conv", ["in", "out", *kernel_axes])
        return info("conv", ["out", "in", *kernel_axes])

    return info("other", _generic_axes(shape), f"a parameter of {mod_name} that no rule reads: axes unknown")


# Raw parameters that are tables of token rows (ViT / DeiT / CLIP position embeddings, class,
# distillation, register and mask tokens), by name.
_RAW_EMBEDDINGS = ("pos_embed", "position_embedding", "positional_embedding", "position_embeddings", "cls_token",
                   "class_token", "class_embedding", "dist_token", "register_tokens", "reg_token", "mask_token")
# Embedding tables whose width is the heads (relative position biases).
_HEAD_TABLES = ("relative_attention_bias", "relative_position_bias", "rel_pos_bias")


def _is_raw_embedding(attr: str, owner) -> bool:
    a = attr.lower()
    return not isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) and any(a == n or a.endswith("_" + n) or
                                                                              a.startswith(n) for n in _RAW_EMBEDDINGS)


def _linear_shape(m) -> tuple[int, int] | None:
    """(in, out) of a Linear-like module (torch's Linear, HF's Conv1D), else None."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    return None


def _pair_role(path: str, owner, modules: dict[str, nn.Module]) -> tuple[str, str | None]:
    """The role of a Linear whose name says nothing, from its siblings (the Linears that are
    direct children of the same module): an MLP maps the hidden width H to X and back, so where the
    first sibling (in module order) reads H and every sibling maps H → X or X → H (X ≠ H, some of
    each), those reading H are ``mlp_up`` and those writing it ``mlp_down`` (torchvision's
    ``mlp.0`` / ``mlp.3``, ConvNeXt's ``pwconv1`` / ``pwconv2``); ``other`` otherwise. Returns
    (role, how it was found)."""
    parent = path.rpartition(".")[0]
    prefix = parent + "." if parent else ""
    shapes = {}
    for name, m in modules.items():
        if name.startswith(prefix) and "." not in name[len(prefix):] and name != parent:
            shape = _linear_shape(m)
            if shape is not None:
                shapes[name] = shape
    mine = _linear_shape(owner)
    if len(shapes) < 2 or mine is None:
        return "other", None
    h = next(iter(shapes.values()))[0]   # the first one (in module order) reads the hidden state
    up = [n for n, (i, o) in shapes.items() if i == h and o != h]
    down = [n for n, (i, o) in shapes.items() if o == h and i != h]
    if up and down and len(up) + len(down) == len(shapes) and len({shapes[n][1] for n in up}) == 1 \
            and {shapes[n][0] for n in down} == {shapes[up[0]][1]}:
        x = shapes[up[0]][1]
        if path in up:
            return "mlp_up", f"structure: maps the hidden width {h} to {x}, and a sibling Linear maps it back"
        return "mlp_down", f"structure: maps {x} back to the hidden width {h} that a sibling Linear read"
    return "other", None


def _is_last_layer(info: ParamInfo, modules: dict[str, nn.Module]) -> bool:
    """Whether a Linear-like weight whose name and siblings said nothing is one of the model's
    output layers (ResNet's ``fc``, a classifier or a detection head under any name, CLIP's two
    projections): not the model itself, outside any repeated block (no numeric component in its
    path but the last of a ``Sequential``'s member) and registered after every module of one,
    another layer of the model produces its input width (a Linear's or conv's output, an
    embedding's or norm's width), and no layer reads its output width."""
    if info.is_bias or len(info.shape) != 2 or "out" not in info.axes or "in" not in info.axes:
        return False
    path = info.name.rpartition(".")[0]
    if not path or _in_repeated_block(path, modules):
        return False
    order = list(modules)
    if path not in modules or any(_in_repeated_block(n, modules) for n in order[order.index(path) + 1:]):
        return False
    width_in, width_out = info.shape[info.axes.index("in")], info.shape[info.axes.index("out")]
    fed = False
    for name, m in modules.items():
        if name == path:
            continue
        reads, writes = _widths(m)
        if reads == width_out:
            return False
        fed = fed or writes == width_in
    return fed


def _in_repeated_block(path: str, modules: dict[str, nn.Module]) -> bool:
    """Whether the module at `path` lies in one of many like blocks: a numeric component with more
    after it (``h.3.mlp``), or a ``ModuleList``'s member; a ``Sequential``'s last-level member
    (``classifier.1``) is not."""
    parts = path.split(".")
    if any(part.isdigit() for part in parts[:-1]):
        return True
    return parts[-1].isdigit() and not isinstance(modules.get(path.rpartition(".")[0]), nn.Sequential)


def _widths(m: nn.Module) -> tuple[int | None, int | None]:
    """(input width, output width) of a layer: a Linear's, a conv's channels, an embedding's or a
    norm's width (read and written); (None, None) for anything else."""
    shape = _linear_shape(m)
    if shape is not None:
        return shape
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels, m.out_channels
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return None, m.embedding_dim
    if isinstance(m, nn.LayerNorm) and m.normalized_shape:
        return m.normalized_shape[-1], m.normalized_shape[-1]
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return m.num_features, m.num_features
    return None, None


def _is_bias(attr: str) -> bool:
    """Whether a parameter attribute (the last component of its name) is a bias."""
    return attr.endswith("bias")


def _generic_axes(shape) -> list[str]:
    return [f"d{i}" for i in range(len(shape))]


def is_generic_axis(axis: str) -> bool:
    """Whether an axis is one the resolver could not name (``d0``, ``d1``, …)."""
    return axis[:1] == "d" and axis[1:].isdigit()


def _is_rmsnorm(m: nn.Module) -> bool:
    return "rmsnorm" in type(m).__name__.lower() or "layernorm" in type(m).__name__.lower() \
        or type(m).__name__.lower().endswith("norm")


def _linear_role(last: str, context: str, attr: str, lone_square: bool = False) -> str:
    """The role a Linear's name (`last`) and its path (`context`) say. `lone_square`: it maps a
    width to itself and is its module's only Linear, which an MLP's projection named only ``proj``
    or ``c_proj`` never is (gMLP's spatial gating ``mlp_channels.gate.proj`` mixes token positions:
    ``other``; BERT's ``intermediate.dense``, alone in its module, is its up projection even where
    the two widths are equal)."""
    if last in _QKV_NAMES:
        return "attn_qkv"
    if last in _Q_NAMES:
        return "attn_q"
    if last in _K_NAMES:
        return "attn_k"
    if last in _V_NAMES:
        return "attn_v"
    if last in _GATE_NAMES:
        return "mlp_gate"
    if last in _UP_NAMES:
        return "mlp_up"
    if last in _DOWN_NAMES:
        return "mlp_down"
    parent = context.rpartition(".")[0]
    in_attn = any(c in seg for seg in parent.split(".") for c in _ATTN_CONTEXT)
    in_mlp = any(c in seg for seg in parent.split(".") for c in _MLP_CONTEXT)
    if last in _OUT_NAMES and in_mlp and not in_attn:
        return "mlp_down"   # T5's DenseReluDense.wo
    if last in _OUT_NAMES and not in_attn and _is_head_name(parent.rpartition(".")[2]):
        return "lm_head"    # RoBERTa's classifier.out_proj, BART's classification_head.out_proj
    if last in _OUT_NAMES or (last in ("c_proj", "proj", "dense") and in_attn and not in_mlp):
        return "attn_out"
    if last in ("c_proj", "proj", "dense") and in_mlp:
        if lone_square and last != "dense":   # (BERT's intermediate.dense stays mlp_up when square)
            return "other"
        return "mlp_up" if "intermediate" in parent.split(".")[-1:] else "mlp_down"
    if last == "dense" and parent.endswith("output"):
        # BERT: `layer.N.output.dense` is the MLP's down projection.
        return "mlp_down"
    if last in _HEAD_NAMES:
        return "lm_head"
    return "other"


def _is_head_name(component: str) -> bool:
    """Whether a module name says it is a model's output head (``classifier``, ``classification_head``,
    ``lm_head``, ``score``, …)."""
    return component in _HEAD_NAMES or component.endswith("_head") or component.startswith("classif")


def _chain_attr(chain: list, config, names: tuple[str, ...]) -> int | None:
    """The first positive int attribute named in `names` of the modules in `chain` (nearest
    first), then of their configs, then of the model's `config`."""
    return _find_attr([*chain, *(getattr(m, "config", None) for m in chain), config], names)


def _find_attr(modules: Iterable, names: tuple[str, ...]) -> int | None:
    for m in modules:
        if m is None:
            continue
        for n in names:
            v = getattr(m, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _heads(owner, ancestors, config, heads, kv_heads) -> tuple[int | None, int | None]:
    """(query heads, key-value heads) from overrides, the module and its ancestors, then a config."""
    chain = [owner, *ancestors]
    hq = heads or _chain_attr(chain, config, _HEAD_ATTRS)
    hkv = kv_heads or _chain_attr(chain, config, _KV_HEAD_ATTRS) or hq
    return hq, hkv


# Fused Q/K/V layouts of transformers' models, read from their modeling code: q, k, v one after
# the other, or each head's (q, k, v) rows together (`view(..., heads, 3, head_dim)` or
# `view(..., heads, 3 * head_dim).chunk(3)`).
_QKV_CONTIGUOUS = {"gpt2", "imagegpt", "decision_transformer", "phi3", "dbrx", "mpt"}
_QKV_PER_HEAD = {"gpt_neox", "bloom", "persimmon"}


def _model_config(chain, config):
    """The transformers config of the nearest module in `chain` (a projection, then its ancestors)
    that has one, else the model's: a wrapped model (DDP, a user's module around it) keeps its own."""
    for m in chain:
        c = getattr(m, "config", None)
        if isinstance(getattr(c, "model_type", None), str):
            return c
    return config


def _qkv_layout(config, out_features: int, in_features: int, hq, hkv, name: str = "") -> str:
    """How a fused Q/K/V projection lays out q, k and v (`ParamInfo.qkv_layout`): a transformers
    model by its ``model_type``; a model without a transformers config as nanoGPT, timm's ViT and
    `nn.MultiheadAttention` do, one after the other, but only where the widths say it is that
    projection (q, k, v each as wide as the input, or GQA widths from the heads) and its name is
    not one that codebases lay out in different ways (`_QKV_AMBIGUOUS`: Megatron's and GPT-NeoX's
    ``query_key_value`` interleave heads); any other (those, GPT-2's keys-and-values-only
    cross-attention, timm EfficientFormer's per-head q, k, v of unequal widths) is ``unknown`` and
    kept whole."""
    kind = getattr(config, "model_type", None)
    if not isinstance(kind, str):
        if name in _QKV_AMBIGUOUS:
            return "unknown"
        return "contiguous" if out_features == 3 * in_features or (hq and hkv and hq != hkv) else "unknown"
    if kind == "gpt_bigcode":   # multi-query: q, then one head's k and v; else each head's q, k, v together
        return "contiguous" if getattr(config, "multi_query", True) else "per_head"
    if kind == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return "grouped"
        return "contiguous" if getattr(config, "multi_query", False) else "per_head"
    if kind in _QKV_PER_HEAD:
        return "per_head"
    if kind in _QKV_CONTIGUOUS:   # q, k, v one after the other, and all three there (not cross-attention's k, v)
        return "contiguous" if out_features == 3 * in_features or (hq and hkv and hq != hkv) else "unknown"
    return "unknown"


def _qkv_info(info, axes, out_features, sizes, hq, hkv, layout: str, found: str) -> ParamInfo:
    """A fused Q/K/V projection: split the ``out`` axis into q, k, v parts (GQA-aware) where they
    lie one after the other; kept whole (heads known) for any other layout."""
    if layout != "contiguous":
        head_dim = out_features // (hq + 2 * (hkv or hq)) if hq else None
        return info("attn_qkv", axes, found, heads=hq, head_dim=head_dim, qkv_layout=layout)
    if sizes is None:
        if hq and hkv and hq != hkv:
            head_dim = out_features // (hq + 2 * hkv)
            sizes = (hq * head_dim, hkv * head_dim, hkv * head_dim)
        else:
            sizes = (out_features // 3,) * 3
    if sum(sizes) != out_features:
        return info("attn_qkv", axes, found, qkv_layout="unknown")
    head_dim = sizes[0] // hq if hq and sizes[0] % hq == 0 else None
    part_heads = (hq, hkv, hkv) if head_dim and hkv and sizes[1] == hkv * head_dim else None
    return info("attn_qkv", axes, found, heads=hq, head_dim=head_dim if part_heads else None,
                parts=(("q", sizes[0]), ("k", sizes[1]), ("v", sizes[2])), part_heads=part_heads,
                qkv_layout="contiguous")


def _interleaved_info(info, axes, out_features, in_features, hq, hkv, layout: str, found: str,
                      sharded: bool) -> ParamInfo:
    """A fused Q/K/V projection whose rows interleave q, k and v: per head (each head's q, k, v
    rows: ``hkv == hq``) or per key-value group (a group's ``hq / hkv`` query heads, its key, its
    value), split into parts within each group (`ParamInfo.part_groups`). Kept whole where the
    heads are unknown or the widths are not those of q, k and v of heads of ``in / hq`` (a
    cross-attention's keys and values only), and on a row-sharded (FSDP2) parameter, whose rank
    holds pieces of every part (a plan measured and made there keeps it whole, as the optimizer
    there can)."""
    hkv = hkv or hq
    ok = hq and hkv and hq % hkv == 0 and (layout == "grouped" or hq == hkv) and in_features % hq == 0 \
        and out_features == (hq + 2 * hkv) * (in_features // hq)
    if not ok or sharded:
        return info("attn_qkv", axes, found, heads=hq, qkv_layout=layout)
    head_dim = out_features // (hq + 2 * hkv)
    per = hq // hkv
    return info("attn_qkv", axes, found, heads=hq, head_dim=head_dim, qkv_layout=layout,
                parts=(("q", per * head_dim), ("k", head_dim), ("v", head_dim)), part_heads=(hq, hkv, hkv),
                part_groups=hkv)


def _is_ssm_mixer(m) -> bool:
    """Whether `m` is a selective state-space (Mamba) mixer: it holds its state matrix ``A_log`` and
    its skip weight ``D`` itself (Mamba, Mamba-2, Jamba, Falcon-H1, Zamba, Bamba and NemotronH all
    name them so). Linear attention that keeps an ``A_log`` decay without ``D`` (Qwen3-Next's gated
    delta net, Kimi's forget gate) is not one: its projections are queries, keys and values."""
    names = {n for n, _ in m.named_parameters(recurse=False)} if m is not None else set()
    return {"A_log", "D"} <= names


def _ssm_info(info, axes, shape, chain, config, last: str) -> ParamInfo:
    """A Linear of a state-space mixer: the one that reads the model's width and widens it (the
    input and its gate) is ``mlp_up``, the one that writes the model's width back ``mlp_down``,
    as an MLP's pair; the mixer's inner projections (Mamba's ``x_proj``, ``dt_proj``) ``other``."""
    hidden = _chain_attr(chain, config, _HIDDEN_ATTRS)
    width_in, width_out = shape[axes.index("in")], shape[axes.index("out")]
    where = f"in a state-space mixer (it holds A_log), named {last}"
    if hidden is not None and width_in == hidden and width_out > hidden:
        return info("mlp_up", axes, f"structure: {where}, reads the model width {hidden} and widens it to {width_out}")
    if hidden is not None and width_out == hidden and width_in != hidden:
        return info("mlp_down", axes, f"structure: {where}, writes the model width {hidden} back")
    return info("other", axes, f"structure: {where}, one of its inner projections: no role of ours")


_MLA_ATTRS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _mla_info(info, axes, shape, attn, config, last: str) -> ParamInfo | None:
    """A Linear of multi-head latent attention (DeepSeek-V2/V3, Kimi-K2: an attention module, or
    its config, with ``kv_lora_rank``), from its widths and the config: the queries (heads of
    ``qk_nope_head_dim + qk_rope_head_dim`` rows, from the hidden width or ``q_lora_rank``) are
    ``attn_q``; ``kv_b_proj``'s rows, each head's key (``qk_nope_head_dim``) then its value
    (``v_head_dim``) as its modeling code splits them, are ``attn_qkv`` with k and v parts per
    head; the two low-rank compressions (queries', keys' and values') are ``other``. None where
    `attn` is no MLA module or the widths fit none of these."""
    cfg = getattr(attn, "config", None) or config
    dims = [_find_attr([attn, cfg], (a,)) for a in _MLA_ATTRS]
    heads = _find_attr([attn, cfg], _HEAD_ATTRS)
    if attn is None or None in dims or heads is None:
        return None
    rank, nope, rope, v_dim = dims
    q_rank = _find_attr([attn, cfg], ("q_lora_rank",))
    hidden = _find_attr([attn, cfg], _HIDDEN_ATTRS)
    width_in, width_out = shape[axes.index("in")], shape[axes.index("out")]
    mla = f"structure: multi-head latent attention (kv_lora_rank {rank}), named {last}"
    if width_out == heads * (nope + rope) and width_in in (hidden, q_rank):
        return info("attn_q", axes, f"{mla}: {heads} query heads of {nope + rope}", heads=heads, head_dim=nope + rope)
    if width_in == rank and width_out == heads * (nope + v_dim):
        return info("attn_qkv", axes, f"{mla}: each of {heads} heads' key ({nope} rows) and value ({v_dim} rows)",
                    heads=heads, qkv_layout="per_head", parts=(("k", nope), ("v", v_dim)), part_heads=(heads, heads),
                    part_groups=heads)
    if width_in == hidden and width_out in (rank + rope, q_rank):
        what = "keys' and values'" if width_out == rank + rope else "queries'"
        return info("other", axes, f"{mla}: the {what} low-rank compression: no role of ours")
    return None


def _with_role(info: ParamInfo, role: str, heads, kv_heads, found: str = "given") -> ParamInfo:
    d = dict(info.__dict__)
    d["role"], d["found"] = role, found
    if role in ("attn_q", "attn_k", "attn_v") and len(info.view_shape) == 2:
        h = heads if role == "attn_q" else (kv_heads or heads)
        out = info.view_shape[info.axes.index("out")] if "out" in info.axes else info.view_shape[0]
        if h and out % h == 0:
            d["heads"], d["head_dim"] = h, out // h
    return ParamInfo(**d)
