"""Exact block Hessians against the dense `torch.autograd.functional.hessian` of tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowmem
from lowmem.hessian import (HessianError, HessianOperator, HessianTooLarge, RandomForwardError, block_hessian,
                            piece)


class Tiny(nn.Module):
    """Fused q/k/v attention with 2 heads (width 4), an MLP, a tied embedding / LM head."""

    def __init__(self, d: int = 4, vocab: int = 5):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.n_head = 2
        self.c_fc = nn.Linear(d, 2 * d)
        self.c_proj = nn.Linear(2 * d, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, 2, C // 2).transpose(1, 2) for t in (q, k, v))
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(torch.tanh(self.c_fc(x)))
        return self.lm_head(x)


def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batches(n=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, 5, (3, 6), generator=g)
        out.append((x, (x + 1) % 5))
    return out


def tiny():
    torch.manual_seed(0)
    return Tiny().double()


def full_hessian(model, bs):
    """The whole model's Hessian of the mean loss (float64, dense autograd), and each canonical
    parameter's offset in it."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())
    sizes = [p.numel() for p in params]

    def f(*ps):
        subs = dict(zip(names, ps))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return sum(loss_fn(lambda x: torch.func.functional_call(model, subs, (x,)), b) for b in bs) / len(bs)

    model.eval()
    blocks = torch.autograd.functional.hessian(f, params)
    rows = [torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], dim=1)
            for i in range(len(params))]
    offsets = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))]))
    return torch.cat(rows), offsets


@pytest.fixture(scope="module")
def reference():
    model = tiny()
    return model, full_hessian(model, batches())


def flat(model, reference, selector):
    _, (_, offsets) = reference
    p = piece(model, selector)
    return offsets[p.name] + p.index


def test_diagonal_blocks_equal_the_dense_hessian_and_are_symmetric(reference):
    model, (H, _) = reference
    for sel in ("c_attn.weight", "c_fc.weight", "c_fc.bias", "wte.weight"):
        got = block_hessian(model, loss_fn, batches(), sel)
        idx = flat(model, reference, sel)
        torch.testing.assert_close(got, H[idx][:, idx], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got, got.T, rtol=1e-10, atol=1e-13)


def test_cross_blocks_and_sub_views_equal_slices_of_the_full_hessian(reference):
    model, (H, _) = reference
    pairs = [("c_attn.weight[part=q]", "c_attn.weight[part=k]"),
             ("c_attn.weight[part=q, head=1]", "c_proj.weight"),
             ("c_fc.weight[1:3, 0:2]", "c_attn.bias"),
             ("c_attn.weight[part=v, head=0]", "c_attn.weight[part=v, head=0]"),
             ("lm_head.weight", "c_fc.weight")]                  # a tied name resolves to wte
    for a, b in pairs:
        got = block_hessian(model, loss_fn, batches(), a, b)
        ia, ib = flat(model, reference, a), flat(model, reference, b)
        torch.testing.assert_close(got, H[ia][:, ib], rtol=1e-10, atol=1e-12, msg=f"{a} x {b}")


def test_batched_rows_equal_looped_rows_and_the_model_is_left_as_it_was():
    model = tiny().float().train()
    before = [p.detach().clone() for p in model.parameters()]
    a = block_hessian(model, loss_fn, batches(), "c_attn.weight[part=q]", dtype=torch.float64, batched=True, chunk=5)
    b = block_hessian(model, loss_fn, batches(), "c_attn.weight[part=q]", dtype=torch.float64, batched=False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert a.dtype == torch.float64 and model.training
    assert all(p.dtype == torch.float32 and torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_selectors_resolve_heads_and_parts_by_hand():
    model = tiny()
    p = piece(model, "c_attn.weight[part=k, head=1]")         # k rows 4..7, head 1 = rows 6, 7
    assert p.box == (2, 4) and p.index.tolist() == list(range(24, 32))
    assert piece(model, "c_fc.weight[2:4, 1:3]").index.tolist() == [9, 10, 13, 14]
    for bad, text in (("nope.weight", "no trainable parameter"), ("c_fc.weight[part=q]", "not a fused"),
                      ("c_attn.weight[part=q, head=2]", "out of range"), ("c_fc.weight[9:12]", "out of range"),
                      ("c_fc.weight[x]", "cannot read slice")):
        with pytest.raises(HessianError, match=text):
            piece(model, bad)


def test_too_large_a_block_is_refused_before_any_work_with_what_to_do():
    model = tiny()
    with pytest.raises(HessianTooLarge, match=r"c_attn\.weight\[head=0\]|sub-view") as e:
        block_hessian(model, loss_fn, batches(), "c_attn.weight", max_bytes=1000)
    assert "48 × 48" in str(e.value) and "estimates" in str(e.value)


def test_a_random_forward_pass_is_refused():
    class Noisy(Tiny):
        def forward(self, idx):
            return F.dropout(super().forward(idx), p=0.5, training=True)   # ignores eval()

    torch.manual_seed(0)
    with pytest.raises(RandomForwardError, match="random even in eval"):
        block_hessian(Noisy().double(), loss_fn, batches(), "c_fc.bias")


def test_operator_products_equal_the_dense_block(reference):
    model, (H, _) = reference
    sels = ["c_attn.weight[part=q]", "c_fc.bias"]
    idx = torch.cat([flat(model, reference, s) for s in sels])
    with HessianOperator(model, loss_fn, batches(), sels) as op:
        v = torch.randn(3, op.dim, dtype=torch.float64)
        torch.testing.assert_close(op(v), v @ H[idx][:, idx], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op(v[0]), H[idx][:, idx] @ v[0], rtol=1e-10, atol=1e-12)


def test_public_entry_point():
    model = tiny()
    got = lowmem.block_hessian(model, loss_fn, batches(1), "c_fc.bias")
    assert got.shape == (8, 8)


def test_estimates_through_the_model_operator_agree_with_the_exact_block():
    # The at-scale path on a real model: Hutchinson's diagonal within its stated error of the
    # exact diagonal, Lanczos' λmax equal to eigvalsh of the exact block.
    from lowmem.hessian import extreme_eigenvalues, hutchinson_diagonal
    model = tiny()
    sel = "c_attn.weight[part=q]"
    exact = block_hessian(model, loss_fn, batches(), sel)
    gen = torch.Generator().manual_seed(0)
    with HessianOperator(model, loss_fn, batches(), [sel]) as op:
        diag = hutchinson_diagonal(op, op.dim, 400, gen)
        eig = extreme_eigenvalues(op, op.dim, op.dim, gen)
    err = (diag.diagonal - exact.diagonal()).abs()
    assert float((err <= 4 * diag.stderr + 1e-12).double().mean()) >= 0.9
    lam = torch.linalg.eigvalsh(exact)
    assert eig.largest.value == pytest.approx(float(lam[-1]), rel=1e-8, abs=1e-12)
    assert eig.smallest.value == pytest.approx(float(lam[0]), rel=1e-8, abs=1e-12)
