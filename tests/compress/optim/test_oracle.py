"""Every plan optimizer on every backend against a numpy float64 oracle of DESIGN §5.

The oracle reads nothing of the engine: only the plan's JSON (per layer `view`, `reduce`, and
`parts` with `dim`, `start`, `stop`, `view`, `reduce`, slicing the layer's `view`) and the hyper-parameters each case
passes, and steps numpy arrays with the gradients read from ``p.grad`` before each
``opt.step()``. Parameters, ``exp_avg`` and ``exp_avg_sq`` must agree to 1e-12 after every step.

Each case names a backend preference (`ReducedAdamW(backend=...)`); `choose_backend` then runs
every bucket on the first backend of that preference that serves it, so the ``foreach`` cases
also run torch's fused AdamW kernel (full-Adam tensors on CPU) and the ``compiled`` cases hand
parts, 0-dim tensors and other reductions to foreach; `test_each_preference_runs_the_backends_it_names`
checks which ran. The compiled backend compiles once per set of shapes: its first case takes
some seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowmem
from lowmem.compress.optim.engine import BACKEND_CHOICES
from lowmem.compress import LayerPlan, PartPlan, build_preset

from optim_cases import PLAN_OPTIMIZERS, OptimInfo

# The engine's backend preferences, as optimizer keyword arguments.
BACKENDS = {name: {"backend": name} for name in BACKEND_CHOICES}

VOCAB, D, N_HEAD, T, B = 11, 8, 2, 6, 4   # vocabulary, width, heads, sequence length, batch
BETAS, EPS = (0.8, 0.95), 1e-6            # not torch's defaults, so a backend that drops them fails
STEPS = 6
TOL = 1e-12                               # rtol and atol, float64


# -- the model: GPT-2's names, so the plans carry parts (c_attn) and per-head views --------------
class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = N_HEAD
        self.c_attn = nn.Linear(D, 3 * D)             # (3D, D): q, k, v rows
        self.c_proj = nn.Linear(D, D)

    def forward(self, x):                             # (B, T, D)
        q, k, v = (t.view(B, T, N_HEAD, D // N_HEAD).transpose(1, 2) for t in self.c_attn(x).split(D, dim=2))
        att = q @ k.transpose(-1, -2) / (D // N_HEAD) ** 0.5                          # (B, h, T, T)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=att.device).triu(1), float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(D, 4 * D)               # (4D, D)
        self.c_proj = nn.Linear(4 * D, D)             # (D, 4D)

    def forward(self, x):
        return self.c_proj(nn.functional.gelu(self.c_fc(x)))


class TinyGPT(nn.Module):
    """One GPT-2 block with an untied LM head and a 0-dim output gain."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.wpe = nn.Embedding(T, D)
        self.ln_1 = nn.LayerNorm(D)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = MLP()
        self.ln_f = nn.LayerNorm(D)
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx):                           # (B, T) -> (B, T, VOCAB)
        x = self.wte(idx) + self.wpe.weight
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return self.lm_head(self.ln_f(x) * self.gain)


def tiny_gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT().double()


def loss_at(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (B, T), generator=g).to(next(model.parameters()).device)
    y = (x * 3 + 1) % VOCAB
    return nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def hand_plan(model: nn.Module):
    """Views no preset makes: a 3-D view reducing its middle dim, interleaved parts (each head's
    q, k, v rows together, as GPT-NeoX lays them: the parts slice the rows of each head, strided)
    with a full-Adam slice and two non-adjacent reduced dims, parts of a bias, ``reduce: []``, a
    reshaped 0-dim gain."""
    plan = build_preset("slimadam-rules", model)
    L = plan.layers
    L["mlp.c_fc.weight"] = LayerPlan([4 * D, D], "mlp_up", [4, 8, D], [1])
    hd = D // N_HEAD
    L["attn.c_attn.weight"] = LayerPlan([3 * D, D], "attn_qkv", [N_HEAD, 3 * hd, D], None, parts=[
        PartPlan("v", 1, 2 * hd, 3 * hd, [D, 2, D // 2], [0, 2]),   # listed first: order is by start
        PartPlan("q", 1, 0, hd, [N_HEAD, hd, D], [1]),
        PartPlan("k", 1, hd, 2 * hd, [D, D], None)])
    L["attn.c_attn.bias"] = LayerPlan([3 * D], "bias", [3 * D], None, parts=[
        PartPlan("q", 0, 0, D, [D], [0]),
        PartPlan("k", 0, D, 2 * D, [2, D // 2], []),
        PartPlan("v", 0, 2 * D, 3 * D, [D // 2, 2], [1])])
    L["wte.weight"] = LayerPlan([VOCAB, D], "embedding", [VOCAB, D], [])
    L["wpe.weight"] = LayerPlan([T, D], "embedding", [T * D], None)
    L["lm_head.weight"] = LayerPlan([VOCAB, D], "lm_head", [VOCAB, 2, D // 2], [0, 2])
    L["gain"] = LayerPlan([], "other", [1], [0])
    return plan


CASES = PLAN_OPTIMIZERS + [OptimInfo("hand-plan", lambda m, **kw: lowmem.ReducedAdamW(m, hand_plan(m), **kw))]


# -- the oracle ----------------------------------------------------------------------------------
def _blocks(shape: tuple[int, ...], layer: dict | None) -> list[tuple[tuple, tuple, tuple[int, ...], tuple[int, ...]]]:
    """(shape the parameter is read as, index into it, view, reduce dims) per block, parts in start
    order (a part slices the layer's view); reduce () is full Adam."""
    if layer is None:
        return [(shape, (...,), shape, ())]
    if not layer.get("parts"):
        return [(shape, (...,), tuple(layer["view"]), tuple(layer["reduce"] or ()))]
    out = []
    source = tuple(layer["view"])
    for part in sorted(layer["parts"], key=lambda p: p["start"]):
        index = [slice(None)] * len(source)
        index[part["dim"]] = slice(part["start"], part["stop"])
        out.append((source, tuple(index), tuple(part["view"]), tuple(part["reduce"] or ())))
    return out


class NumpyPlanAdamW:
    """DESIGN §5 in numpy float64: per block, with ``r`` its reduce dims,

        m ← β1 m + (1−β1) g
        v ← β2 v + (1−β2) mean_r(g²)     (keepdims; r empty: g²)
        θ ← θ (1 − lr·λ)
        θ ← θ − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + ε)

    Args:
        params: name -> starting value.
        layers: the plan's JSON ``layers`` (a name missing: full Adam).
        hparams: name -> (lr, weight_decay).
    """

    def __init__(self, params: dict[str, np.ndarray], layers: dict[str, dict],
                 hparams: dict[str, tuple[float, float]], betas, eps: float, maximize: bool):
        self.theta = {n: p.copy() for n, p in params.items()}
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.blocks = {n: _blocks(p.shape, layers.get(n)) for n, p in params.items()}
        self.v = {n: [np.zeros([1 if d in r else s for d, s in enumerate(view)]) for _, _, view, r in bs]
                  for n, bs in self.blocks.items()}
        self.layers, self.hparams = layers, hparams
        self.b1, self.b2, self.eps, self.maximize, self.t = *betas, eps, maximize, 0

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        for n, g in grads.items():
            lr, wd = self.hparams[n]
            g = -g if self.maximize else g
            theta, m = self.theta[n], self.m[n]
            m[...] = b1 * m + (1 - b1) * g
            theta *= 1 - lr * wd
            for i, (source, index, view, r) in enumerate(self.blocks[n]):
                at = theta.reshape(source)[index]                     # a numpy view: updates land in theta
                sq = g.reshape(source)[index].reshape(view) ** 2
                v = self.v[n][i] = b2 * self.v[n][i] + (1 - b2) * (sq.mean(axis=r, keepdims=True) if r else sq)
                u = (m.reshape(source)[index].reshape(view) / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + self.eps)
                at -= lr * u.reshape(at.shape)

    def exp_avg_sq(self, n: str) -> np.ndarray:
        """`v` as the optimizer keeps it: one flat vector of every part's kept entries, the kept
        shape where the whole parameter is reduced, else the parameter's shape."""
        layer, vs = self.layers.get(n) or {}, self.v[n]
        if layer.get("parts"):
            return np.concatenate([v.ravel() for v in vs])
        return vs[0] if layer.get("reduce") else vs[0].reshape(self.theta[n].shape)


# -- the cases -----------------------------------------------------------------------------------
def _scenario(name: str, model: nn.Module) -> tuple[dict, dict[str, tuple[float, float]], bool]:
    """(optimizer kwargs, name -> (lr, weight decay), maximize) of one scenario."""
    names = dict(model.named_parameters())
    if name == "groups":   # matrices and the rest: different lr and weight decay
        matrices = [n for n, p in names.items() if p.dim() >= 2]
        rest = [n for n in names if n not in matrices]
        kw = {"lr": 1e-2, "weight_decay": 0.5, "param_groups": [
            {"params": [names[n] for n in matrices], "lr": 2e-2, "weight_decay": 0.1},
            {"params": [names[n] for n in rest], "lr": 5e-3, "weight_decay": 0.03}]}
        return kw, {**{n: (2e-2, 0.1) for n in matrices}, **{n: (5e-3, 0.03) for n in rest}}, False
    if name == "maximize":
        return {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}, {n: (1e-2, 0.1) for n in names}, True
    if name == "tensor-lr":   # a float32 tensor: the oracle steps with the number it holds
        lr = torch.tensor(1e-2)
        return {"lr": lr, "weight_decay": 0.1}, {n: (float(lr), 0.1) for n in names}, False
    raise ValueError(name)


SCENARIOS = ("groups", "maximize", "tensor-lr")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("info", CASES, ids=lambda i: i.name)
def test_parameters_and_state_equal_the_numpy_oracle_after_every_step(info, backend, scenario):
    model = tiny_gpt()
    params = dict(model.named_parameters())
    kw, hparams, maximize = _scenario(scenario, model)
    opt = info(model, betas=BETAS, eps=EPS, **kw, **BACKENDS[backend])
    layers = opt.plan.to_json()["layers"] if opt.plan is not None else {}
    assert opt.plan is None or set(layers) == set(params)
    start = {n: p.detach().numpy().copy() for n, p in params.items()}
    oracle = NumpyPlanAdamW(start, layers, hparams, BETAS, EPS, maximize)
    for step in range(STEPS):
        opt.zero_grad()
        loss_at(model, step).backward()
        oracle.step({n: p.grad.detach().numpy().copy() for n, p in params.items()})
        opt.step()
        for n, p in params.items():
            at = f"{info.name}/{backend}/{scenario}: {n} after step {step + 1}"
            state = opt.state[p]
            np.testing.assert_allclose(p.detach().numpy(), oracle.theta[n], rtol=TOL, atol=TOL, err_msg=at)
            np.testing.assert_allclose(state["exp_avg"].numpy(), oracle.m[n], rtol=TOL, atol=TOL,
                                       err_msg=f"exp_avg of {at}")
            want = oracle.exp_avg_sq(n)
            assert tuple(state["exp_avg_sq"].shape) == want.shape, f"exp_avg_sq shape of {at}"
            np.testing.assert_allclose(state["exp_avg_sq"].numpy(), want, rtol=TOL, atol=TOL,
                                       err_msg=f"exp_avg_sq of {at}")
    for n, p in params.items():   # every parameter moved: the comparison is not of untouched values
        assert np.abs(p.detach().numpy() - start[n]).max() > 1e-6, n


# -- what the cases cover ------------------------------------------------------------------------
def _features(layers: dict) -> set[str]:
    """The kinds of block a plan's JSON holds, as the oracle test needs them covered."""
    found = set()
    for layer in layers.values():
        if layer.get("parts"):
            found.add("parts")
            if list(layer["view"]) != list(layer["shape"]):
                found.add("interleaved parts")     # the parts slice the rows of each head
        for b in layer.get("parts") or [layer]:
            view, r = b["view"], b["reduce"]
            if len(view) == 2 and r == [0]:
                found.add("column reduction")      # one v per column: fan_out averaged
            if len(view) == 3 and view[0] == N_HEAD and r and 0 not in r:
                found.add("per-head view")
            if len(view) == 3 and r == [1]:
                found.add("middle-dim reduction")
            if r == []:
                found.add("empty reduce")
    return found


COVERS = {"slimadam": {"parts", "column reduction"},
          "eve": {"parts"},
          "adam-mini": {"parts", "per-head view"},
          "adam-mini-paper": {"parts", "per-head view"},
          "adalayer": {"parts"},
          "hand-plan": {"parts", "interleaved parts", "per-head view", "middle-dim reduction", "empty reduce"}}


@pytest.mark.parametrize("info", CASES, ids=lambda i: i.name)
def test_oracle_cases_cover_parts_per_head_views_and_column_reductions(info):
    opt = info(tiny_gpt())
    layers = opt.plan.to_json()["layers"] if opt.plan is not None else {}
    missing = COVERS.get(info.name, set()) - _features(layers)
    assert not missing, f"{info.name}'s plan no longer has {sorted(missing)}"
    assert {"parts", "interleaved parts", "column reduction", "per-head view", "middle-dim reduction",
            "empty reduce"} <= \
        set().union(*COVERS.values())


@pytest.mark.parametrize("backend, expected", [("reference", {"reference"}), ("foreach", {"fused", "foreach"}),
                                               ("compiled", {"compiled", "foreach"})])
def test_each_preference_runs_the_backends_it_names(backend, expected):
    # The oracle cases above reach every backend: which one runs each tensor of the SlimAdam case
    # (full-Adam norms, compressed matrices, fused q/k/v parts, a 0-dim gain).
    model = tiny_gpt()
    opt = lowmem.SlimAdam(model, backend=backend)
    loss_at(model, 0).backward()
    assert {opt.backend_of(p).name for p in model.parameters()} == expected


def test_an_unknown_backend_is_refused_by_name():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="Invalid backend: 'fast'"):
        lowmem.SlimAdam(model, backend="fast")
    with pytest.raises(ValueError, match="Invalid backend: 'fast'"):   # per group too
        lowmem.SlimAdam(model, param_groups=[{"params": list(model.parameters()), "backend": "fast"}])


def test_compiled_backend_compiles_a_few_bucket_make_ups_then_runs_foreach(monkeypatch):
    # Gradients missing from a different parameter each step change the compiled bucket's list
    # of shapes every step; past the cap new make-ups run foreach instead of compiling (dynamo
    # would refuse the function past its recompile limit). The numbers equal the reference backend's.
    from lowmem.compress.optim import backends
    monkeypatch.setattr(backends, "MAX_COMPILED_SIGNATURES", 2)
    monkeypatch.setattr(backends, "_compiled_signatures", set())
    models = [tiny_gpt(), tiny_gpt()]
    opts = [lowmem.Eve(models[0], lr=1e-2, backend="reference"), lowmem.Eve(models[1], lr=1e-2, backend="compiled")]
    for step in range(6):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            loss_at(model, step).backward()
            params = list(model.parameters())
            params[step % len(params)].grad = None
            opt.step()
    assert len(backends._compiled_signatures) == 2
    for a, b in zip(*(m.parameters() for m in models)):   # two paths, each within 1e-12 of the oracle
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_compiled_backend_leaves_low_precision_state_to_foreach():
    # Its scalars are 0-d tensors in the state dtype: in bf16 beta2 = 0.999 rounds to 1.0.
    model = tiny_gpt().to(torch.bfloat16)
    opt = lowmem.Eve(model, backend="compiled", state_dtype=torch.bfloat16)
    assert {opt.backend_of(p).name for p in model.parameters()} == {"foreach", "fused"}
    fp32 = lowmem.Eve(tiny_gpt().float(), backend="compiled")
    assert "compiled" in {fp32.backend_of(p).name for p in fp32.param_groups[0]["params"]}


def _peak_allocated_during(fn) -> int:
    """Peak bytes torch's CPU allocator holds during `fn()` above what it held before (the running
    sum of the allocation events `torch.profiler` records, as benchmarks/optimizer_step.py)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
    except AttributeError:
        pytest.skip("torch.profiler's event API moved")
    run = peak = 0
    for e in events:
        run += e.nbytes()
        peak = max(peak, run)
    return peak


def test_reference_backend_holds_one_state_dtype_copy_of_a_gradient_at_a_time():
    # bf16 parameters with fp32 state step in the reference backend through fp32 copies; made
    # one tensor at a time, a step's peak is a few copies of one matrix, not one of every gradient.
    torch.manual_seed(0)
    n, width = 12, 64
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(n)]).to(torch.bfloat16)
    opt = lowmem.Eve(model, backend="foreach")          # torch ops only: bf16 parameters go to the reference
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()                                          # allocates the state
    assert {opt.backend_of(p).name for p in model.parameters()} == {"reference"}
    one_copy = width * width * 4
    peak = _peak_allocated_during(opt.step)
    assert one_copy <= peak <= 6 * one_copy < n * one_copy, (peak, one_copy)
    # the default (native) backend steps them where they lie: no fp32 copy at all
    native = lowmem.Eve(model)
    native.step()
    if {native.backend_of(p).name for p in model.parameters()} == {"native"}:
        assert _peak_allocated_during(native.step) < one_copy
