"""Exact block Hessians against the dense `torch.autograd.functional.hessian` of tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowmem
from lowmem.hessian import (DisconnectedError, HessianError, HessianOperator, HessianTooLarge, LossFnError,
                            RandomForwardError, block_hessian, piece)


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
    with pytest.raises(HessianTooLarge, match="sub-view") as e:
        block_hessian(model, loss_fn, batches(), "c_attn.weight", max_bytes=1000)
    # 48 x 48 float64 entries = 18,432 bytes; 1,000 bytes = 0.98 KiB: sizes this small keep their digits
    assert "48 × 48" in str(e.value) and "18.00 KiB in float64, over the 0.98 KiB allowed" in str(e.value)
    assert "estimates" in str(e.value)
    # the rows it suggests fit: 2 rows of 4 entries, 8 x 8 x 8 = 512 bytes; 3 rows would be 1,152
    assert "'c_attn.weight[0:2]'" in str(e.value)
    assert block_hessian(model, loss_fn, batches(), "c_attn.weight[0:2]", max_bytes=1000).shape == (8, 8)


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


# -- every input a user can get wrong: a clear error, or the right answer ------------------------
def named(fn, name):
    fn.__name__ = name
    return fn


@pytest.mark.parametrize("returned, words", [
    (lambda loss: loss.reshape(1).expand(3), "it returned a tensor of shape (3,): reduce it"),
    (lambda loss: 3, "it returned int 3 (a Python number has no gradient)"),
    (lambda loss: None, "it returned None (is a return statement missing?)"),
    (lambda loss: (loss, 1), "it returned tuple"),
    (lambda loss: torch.tensor(3), "of a real floating-point dtype; it returned a tensor of dtype int64"),
    (lambda loss: loss * (1 + 1j), "it returned a tensor of dtype complex128"),
])
def test_a_loss_fn_that_returns_no_real_scalar_tensor_is_refused_naming_it(returned, words):
    my_loss = named(lambda model, batch: returned(loss_fn(model, batch)), "my_loss")
    with pytest.raises(LossFnError) as e:
        block_hessian(tiny(), my_loss, batches(1), "c_fc.bias")
    assert "loss_fn (my_loss) must return the loss as a scalar torch.Tensor" in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("make", [
    lambda model, batch: loss_fn(model, batch).detach(),
    lambda model, batch: torch.tensor(loss_fn(model, batch).detach().item(), dtype=torch.float64),
])
def test_a_loss_without_a_gradient_is_refused_and_the_model_left_as_it_was(make):
    model = tiny().train()
    with pytest.raises(LossFnError, match=r"returned a loss with no gradient \(requires_grad is False\)"):
        block_hessian(model, make, batches(1), "c_fc.bias")
    with pytest.raises(LossFnError, match="no gradient"):
        HessianOperator(model, make, batches(1), ["c_fc.bias"])
    assert model.training


def test_a_loss_that_is_not_finite_on_a_later_batch_is_refused():
    first, second = batches(2)
    weighted = [(*first, 1.0), (*second, float("nan"))]     # finite on the first batch, which is checked first
    with pytest.raises(LossFnError, match=r"not finite \(nan\)"):
        block_hessian(tiny(), lambda model, b: loss_fn(model, b[:2]) * b[2], weighted, "c_fc.bias")


class Linear(nn.Module):
    """tanh(x W1ᵀ + b1) W2ᵀ + b2, read out by a mean: W2 and b2 enter the loss linearly (a zero
    block), W1 and b1 do not, and W1 × W2 couple; `unused` never enters the forward pass."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mean_out(model, x):
    return model(x).mean()


def dense_hessian(model, x, names):
    """torch's dense Hessian of mean_out over the concatenation of the named parameters, float64."""
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]

    def f(*flat):
        subs = {n: t.view(params[n].shape) for n, t in zip(names, flat)}
        return torch.func.functional_call(model, subs, (x,)).mean()

    blocks = torch.autograd.functional.hessian(f, tuple(params[n].detach().reshape(-1).clone() for n in names))
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                      for i in range(len(names))])


def test_a_piece_that_enters_the_loss_linearly_has_an_exactly_zero_block():
    torch.manual_seed(0)
    model = Linear().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    H = dense_hessian(model, x, names)
    start = dict(zip(names, [0, 12, 16, 24]))
    span = {n: slice(start[n], start[n] + model.get_parameter(n).numel()) for n in names}
    assert torch.count_nonzero(H[span["fc2.bias"]]) == 0 and torch.count_nonzero(H[span["fc2.weight"], span["fc2.weight"]]) == 0
    assert torch.count_nonzero(H[span["fc1.weight"], span["fc2.weight"]]) > 0          # linear, yet coupled
    for a, b in [("fc2.bias", None), ("fc2.weight", None), ("fc2.bias", "fc1.weight"), ("fc1.weight", "fc2.bias"),
                 ("fc2.weight", "fc1.weight"), ("fc1.weight", None)]:
        for batched in (True, False):
            got = block_hessian(model, mean_out, [x], a, b, batched=batched)
            want = H[span[a], span[b or a]]
            assert got.dtype == torch.float64 and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=f"{a} x {b}")
    with HessianOperator(model, mean_out, [x], ["fc2.bias", "fc2.weight"]) as op:
        assert torch.count_nonzero(op(torch.randn(2, op.dim, dtype=torch.float64))) == 0


def test_a_weight_times_its_input_summed_has_a_zero_block():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, dtype=torch.float64))

    x = torch.randn(4, dtype=torch.float64)
    got = block_hessian(Scale(), lambda model, x: (model.w * x).sum(), [x], "w")
    want = torch.autograd.functional.hessian(lambda w: (w * x).sum(), torch.randn(4, dtype=torch.float64))
    assert torch.equal(want, torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(got, want)


def test_a_parameter_the_loss_does_not_use_is_an_error_not_zeros():
    torch.manual_seed(0)
    model = Linear().double().train()
    x = torch.randn(5, 3, dtype=torch.float64)
    for a, b in [("unused.weight", None), ("fc1.weight", "unused.bias"), ("unused.bias", "fc2.bias")]:
        with pytest.raises(DisconnectedError, match=r"the loss does not depend on unused\.(weight|bias): there is "
                                                    "no gradient path"):
            block_hessian(model, mean_out, [x], a, b)
    with pytest.raises(DisconnectedError, match="unused.weight"):
        HessianOperator(model, mean_out, [x], ["fc1.bias", "unused.weight"])
    assert model.training


@pytest.mark.parametrize("selector, words", [
    ("c_attn.weight[part=z]", "part must be one of q, k, v, got 'z'"),
    ("c_fc.weight[part=q]", "not a fused Q/K/V projection"),
    ("c_fc.weight[5:2]", "slice '5:2' is empty"),
    ("c_fc.weight[0:1e9]", "cannot read slice '0:1e9'; expected integers a:b"),
    ("c_fc.weight[::2]", "cannot read slice '::2'"),
    ("c_fc.weight[0:99]", "out of range for a dim of size 8 (0:8 is all of it)"),
    ("c_fc.weight[0:1, 0:1, 0:1]", "3 slices, but c_fc.weight has 2 dim(s) (shape (8, 4))"),
    ("c_attn.weight[part=q, part=k]", "part= is given twice"),
    ("c_attn.weight[part=q, head=0, head=1]", "head= is given twice"),
    ("c_attn.weight[head=0]", "fused Q/K/V projection; name the part of the head as well, "
                              "e.g. c_attn.weight[part=q, head=0]"),
    ("c_attn.weight[part=q, head=one]", "head must be an integer, got 'one'"),
    ("c_fc.weight[row=1]", "unknown key 'row'"),
    ("c_fc.wieght", "no trainable parameter 'c_fc.wieght' in the model; did you mean c_fc.weight"),
    ("c_fc", "c_fc is a module, not a parameter; its parameters: c_fc.weight, c_fc.bias"),
    ("frozen.weight", "frozen.weight is frozen (requires_grad=False)"),
    ("scale", "scale is a buffer, not a parameter"),
    ("", "cannot read the block selector"),
    ("c_fc.weight[0:2", "cannot read the block selector"),
])
def test_a_bad_selector_names_itself_and_the_problem(selector, words):
    model = tiny()
    model.frozen = nn.Linear(2, 2).requires_grad_(False)
    model.register_buffer("scale", torch.ones(2))
    with pytest.raises(HessianError) as e:
        piece(model, selector)
    assert str(e.value).startswith(f"{selector!r}: ") and words in str(e.value)


def test_part_and_head_apply_before_slices_whatever_the_order():
    model = tiny()
    expected = list(range(24, 28))     # k is rows 4..7; its head 1 rows 6, 7; [0:1] row 6; width 4
    for selector in ("c_attn.weight[part=k, head=1, 0:1]", "c_attn.weight[0:1, part=k, head=1]",
                     "c_attn.weight[head=1, 0:1, part=k]"):
        assert piece(model, selector).index.tolist() == expected, selector


def test_bad_arguments_are_refused_with_their_value():
    model, bs = tiny(), batches(1)
    cases = [
        (dict(chunk=0), ValueError, "Invalid chunk: 0"),
        (dict(max_bytes=-1), ValueError, "Invalid max_bytes: -1"),
        (dict(dtype=torch.int64), TypeError, "Invalid dtype: torch.int64; expected a floating-point torch.dtype"),
        (dict(dtype="float64"), TypeError, "Invalid dtype: 'float64'"),
        (dict(batches=bs[0][0]), TypeError, "batches is one tensor; pass a list of batches"),
        (dict(batches=None), TypeError, "batches must be a list (or iterable) of batches, e.g. [batch]; got NoneType"),
        (dict(batches=[]), HessianError, "no batches given"),
        (dict(name=3), TypeError, "a block selector is a string such as 'fc.weight[0:4]' or a Piece, got int 3"),
        (dict(other=piece(Tiny(d=6), "c_fc.weight")), HessianError, "shape (12, 6), but c_fc.weight in this model"),
        (dict(loss_fn="mse"), TypeError, "loss_fn must be a function loss_fn(model, batch)"),
    ]
    for change, kind, words in cases:
        kwargs = {"model": model, "loss_fn": loss_fn, "batches": bs, "name": "c_fc.bias", **change}
        with pytest.raises(kind) as e:
            block_hessian(**kwargs)
        assert words in str(e.value), change


def test_operator_refuses_no_pieces_overlaps_wrong_vectors_and_use_after_close():
    model, bs = tiny(), batches(1)
    with pytest.raises(HessianError, match="no pieces given"):
        HessianOperator(model, loss_fn, bs, [])
    with pytest.raises(HessianError, match=r"the pieces c_fc\.weight, c_fc\.weight\[0\] overlap"):
        HessianOperator(model, loss_fn, bs, ["c_fc.weight", "c_fc.weight[0]"])
    op = HessianOperator(model, loss_fn, bs, "c_fc.bias")              # one selector is one piece, not letters
    assert op.dim == 8
    with pytest.raises(ValueError, match=r"expected a vector of 8 entries or a \(k, 8\) tensor of rows, got \(3,\)"):
        op(torch.ones(3, dtype=torch.float64))
    op.close()
    with pytest.raises(HessianError, match="closed"):
        op(torch.ones(8, dtype=torch.float64))
