"""AdaMeM and Adafactor with momentum against independent numbers: torch.optim.Adafactor, a
numpy float64 transcription of the AdaMeM paper's Algorithms 1–4, exact SVDs, hand counts."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from lowmem import AdafactorMomentum, AdaMeM
from lowmem.compress.optim.adamem import (adafactor_state_numel, adamem_directions, adamem_state_numel,
                                          randomized_left_singular_vectors, top_left_singular_vectors)


class Net(nn.Module):
    """An embedding (Adafactor), a wide and a tall matrix (projected; the tall one transposed),
    a bias, a convolution's 3-D weight (projected as 4 × 6) and a 3-D tensor whose axes lowmem
    cannot name (a full statistic: which dims form its matrix is unknown)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.wte = nn.Embedding(7, 6, dtype=dtype)
        self.wide = nn.Linear(10, 6, bias=True, dtype=dtype)      # (6, 10)
        self.tall = nn.Linear(5, 12, bias=False, dtype=dtype)     # (12, 5)
        self.conv = nn.Conv1d(2, 4, 3, bias=False, dtype=dtype)   # weight (4, 2, 3): out, in, kw
        self.blob = nn.Parameter(torch.randn(3, 2, 2, dtype=dtype))

    def loss(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 7, (5,), generator=g)
        x = torch.randn(5, 10, generator=g, dtype=self.wide.weight.dtype)
        h = torch.tanh(self.wide(x) + self.wte(idx))                          # (5, 6)
        y = self.tall(torch.cat([h[:, :5]], dim=1))                            # (5, 12)
        z = torch.einsum("bi,ijk->bjk", h[:, :4], self.conv.weight)            # (5, 2, 3)
        u = torch.einsum("bi,ijk->bjk", h[:, :3], self.blob)                   # (5, 2, 2)
        return (y ** 2).mean() + (z.sin() ** 2).mean() + 0.1 * (h ** 3).mean() + (u.cos() ** 2).mean()


def grads_of(model):
    return {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}


# -- AdaMeM against a numpy transcription of the paper ------------------------------------------
class NumpyAdaMeM:
    """Algorithm 1 with Algorithms 2–4, as the paper writes them, plus bias correction (statistics
    of the corrected momentum) and ε (which the paper leaves out "for simplicity"), the one-sided
    statistic per column (what Claim 3.1's proof uses), residual columns at round-off taken as 0,
    and Adafactor without momentum for the embedding and vectors."""

    def __init__(self, params, lr, beta1, beta2, eps, wd, rank, gap, projected, full=()):
        self.p = {k: v.copy() for k, v in params.items()}
        self.lr, self.b1, self.b2, self.eps, self.wd, self.rank, self.gap = lr, beta1, beta2, eps, wd, rank, gap
        self.projected, self.full, self.s, self.t = projected, set(full), {}, 0

    def step(self, grads):
        self.t += 1
        t, b1, b2, eps = self.t, self.b1, self.b2, self.eps
        for k, g in grads.items():
            shape = g.shape
            s = self.s.setdefault(k, {})
            if k in self.projected:
                G = g.reshape(shape[0], -1)
                tr = G.shape[0] > G.shape[1]
                G = G.T if tr else G
                m, n = G.shape
                if (t - 1) % self.gap == 0:
                    s["P"] = np.linalg.svd(G, full_matrices=False)[0][:, :self.rank]
                P = s["P"]
                R = P.T @ G
                S = G - P @ R
                s["M"] = b1 * s.get("M", 0) + (1 - b1) * R
                Mhat = s["M"] / (1 - b1 ** t)
                M2 = Mhat ** 2
                s["r"] = b2 * s.get("r", 0) + (1 - b2) * M2.sum(axis=1) / n
                s["c"] = b2 * s.get("c", 0) + (1 - b2) * M2.sum(axis=0) / self.rank
                V = np.outer(s["r"], s["c"]) / s["r"].mean()
                N1 = Mhat / (np.sqrt(V / (1 - b2 ** t)) + eps)
                live = (S ** 2).sum(axis=0) > 64 * np.finfo(S.dtype).eps * (G ** 2).sum(axis=0)
                s["os"] = b2 * s.get("os", 0) + (1 - b2) * live * (S ** 2).sum(axis=0) / m
                N2 = live * S / (np.sqrt(s["os"] / (1 - b2 ** t)) + eps)
                U = P @ N1 + N2
                U = (U.T if tr else U).reshape(shape)
            elif g.ndim >= 2 and k not in self.full:
                G = g.reshape(shape[0], -1)
                s["r"] = b2 * s.get("r", 0) + (1 - b2) * (G ** 2).mean(axis=1)
                s["c"] = b2 * s.get("c", 0) + (1 - b2) * (G ** 2).mean(axis=0)
                V = np.outer(s["r"], s["c"]) / s["r"].mean()
                U = (G / (np.sqrt(V / (1 - b2 ** t)) + eps)).reshape(shape)
            else:
                s["v"] = b2 * s.get("v", 0) + (1 - b2) * g ** 2
                U = g / (np.sqrt(s["v"] / (1 - b2 ** t)) + eps)
            self.p[k] = self.p[k] * (1 - self.lr * self.wd) - self.lr * U


def test_adamem_equals_a_numpy_transcription_of_the_paper_in_float64():
    torch.manual_seed(0)
    model = Net()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdaMeM(model, rank=2, update_proj_gap=1000, **kw)   # one projector: SVD sign conventions
    ref = NumpyAdaMeM({n: p.detach().numpy() for n, p in model.named_parameters()}, 1e-2, 0.9, 0.95,
                      1e-8, 0.1, 2, 1000, projected={"wide.weight", "tall.weight", "conv.weight"}, full={"blob"})
    for step in range(12):
        opt.zero_grad()
        model.loss(step).backward()
        ref.step(grads_of(model))
        opt.step()
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), ref.p[n], rtol=1e-10, atol=1e-12, err_msg=n)


class Twins(nn.Module):
    """Matrices of repeated shapes (two wide, three tall: transposed), which AdaMeM updates in
    batches of one shape, and vectors, which it updates in one batch."""

    def __init__(self):
        super().__init__()
        self.wide = nn.ModuleList(nn.Linear(10, 6, dtype=torch.float64) for _ in range(2))      # (6, 10) + biases
        self.tall = nn.ModuleList(nn.Linear(6, 12, bias=False, dtype=torch.float64) for _ in range(3))   # (12, 6)

    def loss(self, step: int) -> torch.Tensor:
        x = torch.randn(5, 10, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        h = sum(torch.tanh(w(x)) for w in self.wide)
        return sum((t(h) ** 2).mean() * (i + 1) for i, t in enumerate(self.tall))


def _count_batches(monkeypatch) -> list[int]:
    import lowmem.compress.optim.adamem as adamem_module

    calls = []
    batched = adamem_module.adamem_update_batched
    monkeypatch.setattr(adamem_module, "adamem_update_batched", lambda items, *a: calls.append(len(items))
                        or batched(items, *a))
    return calls


def test_batched_same_shape_matrices_and_vectors_equal_the_numpy_transcription(monkeypatch):
    calls = _count_batches(monkeypatch)
    torch.manual_seed(0)
    model = Twins()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdaMeM(model, rank=2, update_proj_gap=1000, **kw)   # one projector: SVD sign conventions
    projected = {n for n, p in model.named_parameters() if p.dim() == 2}
    ref = NumpyAdaMeM({n: p.detach().numpy() for n, p in model.named_parameters()}, 1e-2, 0.9, 0.95, 1e-8, 0.1, 2,
                      1000, projected=projected)
    for step in range(6):
        opt.zero_grad()
        model.loss(step).backward()
        ref.step(grads_of(model))
        opt.step()
    assert sorted(calls) == [2] * 6 + [3] * 6, calls   # the wide pair and the tall triple, each step
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), ref.p[n], rtol=1e-10, atol=1e-12, err_msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_matrices_equal_one_at_a_time_across_projector_refreshes(monkeypatch, dtype):
    # Refreshes carry momentum into the new basis, where SVD signs matter: against the same
    # optimizer one matrix at a time (BATCH_NUMEL 0), in float32 and with bf16 parameters.
    import lowmem.compress.optim.adamem as adamem_module

    runs = []
    for numel in (adamem_module.BATCH_NUMEL, 0):
        monkeypatch.setattr(adamem_module, "BATCH_NUMEL", numel)
        torch.manual_seed(0)
        model = Twins().to(dtype)
        opt = AdaMeM(model, lr=1e-2, rank=2, update_proj_gap=2, maximize=True, weight_decay=0.1)
        for step in range(5):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i)).to(dtype)
            opt.step()
        runs.append(model)
    for (n, a), b in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_a_batch_runs_once_it_holds_batch_entries(monkeypatch):
    # Five matrices of one shape with room for two per batch: batches of 2, 2 and 1 (the last
    # one through adamem_update), the same numbers as one matrix at a time.
    import lowmem.compress.optim.adamem as adamem_module

    calls = _count_batches(monkeypatch)
    runs = []
    for limit in (2 * 6 * 10, 0):
        monkeypatch.setattr(adamem_module, "BATCH_ENTRIES", limit)
        monkeypatch.setattr(adamem_module, "BATCH_NUMEL", adamem_module.BATCH_NUMEL if limit else 0)
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(10, 6, bias=False, dtype=torch.float64) for _ in range(5)))
        opt = AdaMeM(model, lr=1e-2, rank=2)
        for step in range(2):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step * 9 + i))
            opt.step()
        runs.append(model)
    assert calls == [2, 2] * 2, calls
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_refused_gradient_leaves_every_parameter_and_state_as_it_was():
    # The third parameter's gradient is sparse: the step refuses it before updating the others.
    model = Twins()
    opt = AdaMeM(model, lr=1e-2, rank=2)
    model.loss(0).backward()
    opt.step()
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model.loss(1).backward()
    bad = model.wide[1].bias
    bad.grad = bad.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, before[1]["state"][i][k]), (i, k)


def test_projector_is_refreshed_at_the_first_step_and_every_T_steps_keeping_momentum():
    torch.manual_seed(0)
    model = Net()
    opt = AdaMeM(model, lr=1e-2, rank=2, update_proj_gap=3)
    w = model.wide.weight
    seen = []
    for step in range(7):
        opt.zero_grad()
        model.loss(step).backward()
        g = w.grad.detach().clone()
        before = opt.state[w]["exp_avg"].clone() if step else None
        opt.step()
        P, M = opt.state[w]["proj"], opt.state[w]["exp_avg"]
        seen.append(P.clone())
        if step % 3 == 0:                                   # steps 1, 4, 7: P spans G's top-2
            u = np.linalg.svd(g.numpy())[0][:, :2]
            np.testing.assert_allclose((P @ P.T).numpy(), u @ u.T, atol=1e-10)
        if before is not None:                              # momentum carried over, never reset
            np.testing.assert_allclose(M.numpy(), (0.9 * before + 0.1 * P.T @ g).numpy(), atol=1e-12)
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.allclose(seen[2], seen[3])


# -- Claim 3.1 ----------------------------------------------------------------------------------
def _states(m, n, r, g, dtype=torch.float64):
    return {"proj": top_left_singular_vectors(g, r), "exp_avg": torch.zeros(r, n, dtype=dtype),
            "row_var": torch.zeros(r, dtype=dtype), "col_var": torch.zeros(n, dtype=dtype),
            "res_col_var": torch.zeros(n, dtype=dtype)}


def test_claim_3_1_the_two_preconditioned_parts_stay_orthogonal():
    torch.manual_seed(0)
    m, n, r = 16, 40, 4
    g0 = torch.randn(m, n, dtype=torch.float64)
    state = _states(m, n, r, g0)
    for t in range(1, 6):
        g = g0 + 0.3 * torch.randn(m, n, dtype=torch.float64)
        n1, n2 = adamem_directions(g, state, t, (0.9, 0.95), 1e-8)
        a = state["proj"] @ n1
        scale = a.norm() * n2.norm()
        assert scale > 1
        assert float((a.T @ n2).abs().max()) < 1e-12 * float(scale)     # Aᵀ B = 0, column by column
        assert abs(float((a * n2).sum())) < 1e-12 * float(scale)


def test_two_sided_adafactor_on_the_residual_would_break_orthogonality():
    # The paper's "Variant 2": scaling S from the left too leaves P's orthogonal complement.
    torch.manual_seed(0)
    m, n, r = 16, 40, 4
    g = torch.randn(m, n, dtype=torch.float64)
    P = top_left_singular_vectors(g, r)
    S = g - P @ (P.T @ g)
    rows, cols = (S ** 2).mean(dim=1), (S ** 2).mean(dim=0)
    two_sided = S / torch.outer(rows / rows.mean(), cols).sqrt()
    a = P @ (P.T @ g)
    assert abs(float((a * two_sided).sum())) > 1e-3 * float(a.norm() * two_sided.norm())


# -- projectors ---------------------------------------------------------------------------------
def _subspace_distance(p, q):
    return float(torch.linalg.matrix_norm(p @ p.T - q @ q.T, ord=2))


def test_randomized_projector_finds_the_exact_top_r_subspace():
    torch.manual_seed(0)
    m, n, r = 64, 200, 8
    u = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64)).Q
    s = torch.cat([torch.linspace(10, 5, r), 0.5 ** torch.arange(1, m - r + 1)]).double()   # a gap after r
    g = u @ torch.diag(s) @ v.T
    exact = top_left_singular_vectors(g, r)
    np.testing.assert_allclose((exact @ exact.T).numpy(), (u[:, :r] @ u[:, :r].T).numpy(), atol=1e-10)
    gen = torch.Generator().manual_seed(1)
    cold = randomized_left_singular_vectors(g, r, None, gen)
    assert _subspace_distance(cold, exact) < 1e-8
    assert torch.allclose(cold.T @ cold, torch.eye(r, dtype=torch.float64), atol=1e-12)
    # warm start from a nearby subspace (the previous projector) on a matrix with no gap
    g2 = torch.randn(m, n, dtype=torch.float64)
    exact2 = top_left_singular_vectors(g2, r)
    warm = randomized_left_singular_vectors(g2 + 1e-3 * torch.randn(m, n, dtype=torch.float64), r,
                                            exact2, gen)
    captured = float((warm.T @ g2).norm() ** 2 / (exact2.T @ g2).norm() ** 2)
    assert captured > 0.999


def test_randomized_adamem_resumes_bit_identically_across_a_refresh():
    torch.manual_seed(0)
    model = Net(torch.float32)
    opt = AdaMeM(model, lr=1e-2, rank=2, update_proj_gap=2, projector="randomized", seed=3)
    for step in range(3):
        opt.zero_grad()
        model.loss(step).backward()
        opt.step()
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = AdaMeM(clone, lr=1e-2, rank=2, update_proj_gap=2, projector="randomized", seed=3)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for m, o in ((model, opt), (clone, opt2)):
        for step in range(3, 6):                          # refreshes at steps 5
            o.zero_grad()
            m.loss(step).backward()
            o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


# -- memory -------------------------------------------------------------------------------------
def _state_numel(opt):
    return sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")


def test_adamem_memory_is_m_plus_n_times_r_plus_adafactor_statistics():
    torch.manual_seed(0)
    model = Net()
    opt = AdaMeM(model, rank=2)
    model.loss(0).backward()
    opt.step()
    # by hand: wide 6×10: (6+10)·2 + 2 + 2·10 = 54; tall 12×5 → 5×12: 17·2 + 2 + 24 = 60;
    # conv 4×6: 10·2 + 2 + 12 = 34; embedding 7×6 (Adafactor): 13; bias: 6; blob 3×2×2 (axes
    # unnamed): its 12 entries
    assert _state_numel(opt) == 54 + 60 + 34 + 13 + 6 + 12 == adamem_state_numel(model, rank=2)
    assert opt.state[model.blob]["variance"].shape == (3, 2, 2) and "proj" not in opt.state[model.blob]
    w = opt.state[model.tall.weight]
    assert w["proj"].shape == (5, 2) and w["exp_avg"].shape == (2, 12)


def test_memory_estimates_need_no_memory_on_the_meta_device():
    with torch.device("meta"):
        big = nn.Sequential(nn.Linear(4096, 11008, bias=False), nn.Linear(11008, 4096, bias=False))
    # each matrix: m = 4096, n = 11008, r = 1024 → (m + n)·r + r + 2n
    assert adamem_state_numel(big) == 2 * ((4096 + 11008) * 1024 + 1024 + 2 * 11008)
    assert adafactor_state_numel(big, momentum=False) == 2 * (4096 + 11008)
    assert adafactor_state_numel(big) == 2 * (4096 + 11008 + 4096 * 11008)


def test_adafactor_memory_counts_what_torch_adafactor_keeps():
    torch.manual_seed(0)
    model = Net()
    ours, theirs = AdafactorMomentum(model), torch.optim.Adafactor(model.parameters())
    model.loss(0).backward()
    ours.step()
    theirs.step()
    numel = sum(p.numel() for p in model.parameters())
    assert _state_numel(theirs) == adafactor_state_numel(model, momentum=False)
    assert _state_numel(ours) == _state_numel(theirs) + numel == adafactor_state_numel(model)


# -- Adafactor with momentum --------------------------------------------------------------------
def _run(model, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        model.loss(step).backward()
        opt.step()


def test_adafactor_momentum_without_momentum_is_torch_adafactor():
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    _run(a, torch.optim.Adafactor(a.parameters(), lr=3e-2, weight_decay=0.1, d=1.0), 20)
    _run(b, AdafactorMomentum(b, lr=3e-2, beta1=0.0, weight_decay=0.1), 20)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-14)


def test_adafactor_momentum_is_momentum_on_the_clipped_update():
    # Reference: torch.optim.Adafactor's update U, read off a twin that takes one plain step from
    # the same point with the same gradient (so the same statistics), then m ← β1 m + (1 − β1) U
    # and θ ← θ(1 − lr λ) − α m with α recomputed by hand.
    torch.manual_seed(0)
    model = Net()
    opt = AdafactorMomentum(model, lr=3e-2, beta1=0.9, weight_decay=0.1)
    twin = copy.deepcopy(model)
    plain = torch.optim.Adafactor(twin.parameters(), lr=3e-2)
    momentum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for step in range(6):
        t = step + 1
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
        _run(twin, plain, 1, start=step)
        _run(model, opt, 1, start=step)
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            alpha = max(1e-3, float(before[n].norm() / before[n].numel() ** 0.5)) * min(3e-2, t ** -0.5)
            update = (before[n] - q.detach()) / alpha          # the plain step moved θ by α U
            momentum[n] = 0.9 * momentum[n] + 0.1 * update
            expected = before[n] * (1 - 3e-2 * 0.1) - alpha * momentum[n]
            torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-11)


def test_a_torch_adafactor_checkpoint_loads_and_continues_like_torch():
    torch.manual_seed(0)
    a = Net()
    torch_opt = torch.optim.Adafactor(a.parameters(), lr=3e-2)
    _run(a, torch_opt, 4)
    b = copy.deepcopy(a)
    ours = AdafactorMomentum(b, lr=3e-2, beta1=0.0)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    _run(a, torch_opt, 4, start=4)
    _run(b, ours, 4, start=4)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-14)


# -- arguments ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, text", [
    ({"rank": 0}, "Invalid rank: 0"),
    ({"rank_fraction": 1.5}, "Invalid rank_fraction: 1.5"),
    ({"update_proj_gap": 0}, "Invalid update_proj_gap: 0"),
    ({"scale": -1.0}, "Invalid scale: -1.0"),
    ({"projector": "qr"}, "Invalid projector: 'qr'"),
])
def test_bad_adamem_arguments_are_refused_with_the_value(kw, text):
    with pytest.raises(ValueError, match=text.replace(".", r"\.")):
        AdaMeM(Net(), **kw)


def test_rank_defaults_to_a_quarter_of_the_smaller_side():
    model = nn.Linear(64, 32, bias=False)
    opt = AdaMeM(model)
    model(torch.randn(3, 64)).square().sum().backward()
    opt.step()
    assert opt.state[model.weight]["proj"].shape == (32, 8)


def test_two_matmul_update_equals_the_readable_directions_in_float64():
    from lowmem.compress.optim.adamem import adamem_update
    torch.manual_seed(0)
    for m, n, r, scale in ((16, 40, 4, 1.0), (16, 40, 4, 0.5), (40, 40, 40, 1.0)):
        # r = m: S is round-off, which the readable form divides by its own size (N2 is O(1)
        # noise) and the two-matmul form by ~sqrt(round-off) (N2 ≈ 0, the exact answer).
        full_rank = r == m
        g0 = torch.randn(m, n, dtype=torch.float64)
        a, b = _states(m, n, r, g0), _states(m, n, r, g0)
        for t in range(1, 5):
            g = g0 + 0.3 * torch.randn(m, n, dtype=torch.float64)
            n1, n2 = adamem_directions(g, a, t, (0.9, 0.95), 1e-8)
            column_major = g.T.contiguous().T                   # as a transposed weight's gradient
            fast = adamem_update(column_major if t % 2 else g, b, t, (0.9, 0.95), 1e-8, scale)
            expected = a["proj"] @ n1 if full_rank else a["proj"] @ n1 + scale * n2
            torch.testing.assert_close(fast, expected, rtol=1e-10, atol=1e-6 if full_rank else 1e-12)
            for k in a:
                if not (full_rank and k == "res_col_var"):
                    torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-14)


# -- numerical safeguards and per-group arguments -----------------------------------------------
def test_a_gradient_inside_the_projected_span_gives_a_bounded_orthogonal_update_in_float32():
    # A rank-1 gradient (one token) with r = 8: the residual is round-off. Taken at face value it
    # would be divided by its own round-off-sized statistic into an O(1) random direction.
    from lowmem.compress.optim.adamem import adamem_update
    torch.manual_seed(0)
    m, n, r = 32, 64, 8
    for t, form in ((1, "fast"), (1, "readable")):
        g = torch.outer(torch.randn(m), torch.randn(n))
        state = _states(m, n, r, g, torch.float32)
        if form == "fast":
            update = adamem_update(g, state, t, (0.9, 0.95), 1e-8, 1.0)
        else:
            n1, n2 = adamem_directions(g, state, t, (0.9, 0.95), 1e-8)
            update = state["proj"] @ n1 + n2
        low = state["proj"] @ (state["proj"].T @ update)       # its part inside P's span
        assert float(update.abs().max()) < 10, form            # |N1| ≈ 1, N2 = 0 here
        torch.testing.assert_close(update, low, rtol=0, atol=1e-5)


def test_first_step_of_a_constant_gradient_has_unit_size_in_both_parts():
    # With the statistics of the bias-corrected momentum, |N1| is 1 from the first step, like
    # Adam's update and like the residual's N2; on an uncorrected M it would be 1 / (1 − β1) = 10.
    torch.manual_seed(0)
    m, n, r = 8, 20, 2
    g = torch.randn(m, n, dtype=torch.float64)
    state = _states(m, n, r, g)
    rms = lambda x: float(x.square().mean().sqrt())
    for t in range(1, 6):
        n1, n2 = adamem_directions(g, state, t, (0.9, 0.95), 1e-12)
        assert 0.7 < rms(n1) < 1.4                     # factored: about 1, not exactly
        assert rms(n2) == pytest.approx(1.0, rel=1e-9)  # one statistic per column: exactly 1


def test_a_torch_adafactor_checkpoint_of_bf16_parameters_loads():
    torch.manual_seed(0)
    a = Net(torch.bfloat16)
    torch_opt = torch.optim.Adafactor(a.parameters(), lr=3e-2)
    _run(a, torch_opt, 2)
    b = copy.deepcopy(a)
    ours = AdafactorMomentum(b, lr=3e-2, beta1=0.0)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    _run(a, torch_opt, 3, start=2)
    _run(b, ours, 3, start=2)                                # fp32 statistics from then on
    assert all(t.dtype == torch.float32 for s in ours.state.values() for k, t in s.items() if k != "step")
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(y.float(), x.float(), rtol=0.02, atol=0.02)


def test_param_group_arguments_are_checked_and_the_rank_is_fixed_once_trained():
    model = Net()
    with pytest.raises(ValueError, match="Invalid update_proj_gap: 0"):
        AdaMeM(model, param_groups=[{"params": [model.wide.weight], "update_proj_gap": 0},
                                    {"params": [p for n, p in model.named_parameters() if n != "wide.weight"]}])
    opt = AdaMeM(model, rank=2)
    model.loss(0).backward()
    opt.step()
    opt.param_groups[0]["rank"] = 3
    with pytest.raises(ValueError, match="rank cannot change"):
        opt.step()
