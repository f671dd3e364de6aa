"""Plans from Hessian partitions: layouts by hand (exact, and the coarsest refinement of what
view/reduce cannot express), Adam-mini's per-head layout reproduced, and a working optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowmem.compress import Plan, build_preset
from lowmem.compress.optim import optimizer_from_plan
from lowmem.hessian.plans import layout_for, layout_labels, plan_from_partitions
from lowmem.hessian.structure import Partition, candidate_partitions, classify


def runs(sizes: list[int], cols: int) -> Partition:
    """Consecutive runs of whole rows of a (sum(sizes), cols) weight."""
    return Partition.from_labels("runs", torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes) * cols))


# -- layouts ----------------------------------------------------------------------------------


def test_layout_labels_average_the_reduced_dims():
    assert layout_labels([2, 3], [1]).tolist() == [0, 0, 0, 1, 1, 1]
    assert layout_labels([2, 3], [0]).tolist() == [0, 1, 2, 0, 1, 2]
    assert layout_labels([2, 2, 3], [1, 2]).tolist() == [0] * 6 + [1] * 6
    assert layout_labels([2, 3], None).tolist() == list(range(6))


@pytest.mark.parametrize("name, view, reduce", [
    ("per head", [2, 4, 6], [1, 2]),           # heads split the rows, as Adam-mini's preset writes it
    ("per row", [8, 6], [1]),
    ("per column", [8, 6], [0]),
    ("whole", [8, 6], [0, 1]),
])
def test_candidate_partitions_become_their_own_layout(name, view, reduce):
    layout = layout_for(candidate_partitions((8, 6), heads=2)[name], (8, 6))
    assert (layout.view, layout.reduce, layout.exact) == (view, reduce, True)


def test_a_conv_flattens_to_rows_and_a_vector_keeps_full_adam_per_entry():
    conv = layout_for(candidate_partitions((4, 3, 2, 2))["per row"], (4, 3, 2, 2), ("out", "in", "kh", "kw"))
    assert (conv.view, conv.reduce, conv.exact) == ([4, 3, 2, 2], [1, 2, 3], True)
    vec = layout_for(candidate_partitions((5,))["per row"], (5,), ("out",))
    assert (vec.view, vec.reduce, vec.exact) == ([5], None, True)


def test_interleaved_rows_are_expressed_by_a_split_view():
    p = Partition.from_labels("even/odd rows", (torch.arange(4) % 2).repeat_interleave(3))   # rows {0,2}, {1,3}
    layout = layout_for(p, (4, 3))
    assert (layout.view, layout.reduce, layout.exact) == ([2, 2, 3], [0, 2], True)


def test_unequal_row_runs_become_per_row_the_coarsest_refinement():
    layout = layout_for(runs([1, 3], 3), (4, 3))
    assert (layout.view, layout.reduce, layout.exact) == ([4, 3], [1], False)


def test_a_group_that_splits_a_row_falls_back_to_full_adam():
    p = Partition.from_labels("half a row", torch.tensor([0, 0, 1, 1, 1, 1]))   # shape (2, 3): 3 and 2 prime
    layout = layout_for(p, (2, 3))
    assert (layout.view, layout.reduce, layout.exact) == ([2, 3], None, False)


def test_heads_of_a_transposed_conv1d_weight_split_its_columns():
    # HF Conv1D stores (in, out): heads are runs of output columns.
    p = Partition.from_labels("per head", (torch.arange(6) // 3).repeat(8))
    layout = layout_for(p, (8, 6), ("in", "out"))
    assert (layout.view, layout.reduce, layout.exact) == ([8, 2, 3], [0, 2], True)


# -- plans on a tiny model --------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = 2
        self.q = nn.Linear(8, 8, bias=False)        # (8, 8): 2 heads of 4 rows
        self.k = nn.Linear(8, 8, bias=False)
        self.v = nn.Linear(8, 8, bias=False)
        self.c_proj = nn.Linear(8, 8, bias=False)

    def forward(self, x):                                           # (B, T, 8)
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, 2, 4).transpose(1, 2) for f in (self.q, self.k, self.v))   # (B, 2, T, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, 8))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 8)
        self.ln = nn.LayerNorm(8)
        self.attn = Attention()
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(8, 16), c_proj=nn.Linear(16, 8)))
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):                                         # (B, T)
        x = self.wte(idx)
        x = x + self.attn(self.ln(x))
        x = x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(x)))
        return self.lm_head(x)                                      # (B, T, 10)


Q, K, V, FC = "attn.q.weight", "attn.k.weight", "attn.v.weight", "mlp.c_fc.weight"


def tiny() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def test_per_head_partition_of_q_gives_adam_minis_layout():
    model = tiny()
    preset = build_preset("adam-mini", model)
    plan = plan_from_partitions(model, {Q: candidate_partitions((8, 8), heads=2)["per head"]})
    assert (plan.layers[Q].view, plan.layers[Q].reduce) == (preset.layers[Q].view, preset.layers[Q].reduce)
    assert (plan.layers[Q].view, plan.layers[Q].reduce) == ([2, 4, 8], [1, 2])
    assert plan.layers[Q].v_kept == 2


def test_a_planted_per_head_hessian_classified_without_heads_gives_adam_minis_layout():
    gen = torch.Generator().manual_seed(0)
    h = torch.zeros(64, 64, dtype=torch.float64)
    for s in (slice(0, 32), slice(32, 64)):                          # 2 heads of 4 rows x 8 columns
        a = torch.randn(32, 32, generator=gen, dtype=torch.float64)
        h[s, s] = a + a.T
    noise = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    c = classify(h + 0.01 * (noise + noise.T), (8, 8))
    model = tiny()
    plan = plan_from_partitions(model, {Q: c.partition})
    preset = build_preset("adam-mini", model)
    assert c.partition.name == "found" and len(c.partition) == 2
    assert (plan.layers[Q].view, plan.layers[Q].reduce) == (preset.layers[Q].view, preset.layers[Q].reduce)


def test_plan_records_what_was_found_and_what_was_used_and_keeps_the_base_elsewhere():
    model = tiny()
    base = build_preset("adam-mini", model)
    parts = {Q: candidate_partitions((8, 8), 2)["per head"], V: runs([3, 5], 8),
             FC: candidate_partitions((16, 8))["whole"], "lm_head.weight": candidate_partitions((10, 8))["per row"]}
    plan = plan_from_partitions(model, parts, base=base)
    assert plan.source["method"] == "hessian" and plan.source["base"] == base.source
    assert plan.source["partitions"][V] == {"partition": "runs", "groups": 2, "exact": False}
    assert (plan.layers[V].view, plan.layers[V].reduce) == ([8, 8], [1])
    assert "not a view/reduce layout" in plan.layers[V].why and "one value per row" in plan.layers[V].why
    assert (plan.layers[FC].view, plan.layers[FC].reduce) == ([16, 8], [0, 1])
    # the tied embedding, named through its LM-head alias, is one parameter: per row
    assert (plan.layers["wte.weight"].reduce, plan.layers["wte.weight"].aliases) == ([1], ["lm_head.weight"])
    for name in (K, "attn.c_proj.weight", "mlp.c_fc.bias", "ln.weight"):
        assert plan.layers[name].to_json() == base.layers[name].to_json()
    # v kept by hand: q 2, v 8, c_fc 1, wte 10; the rest as adam-mini (k 2, c_proj 8, c_fc.bias 16,
    # mlp.c_proj 8 + bias 8, ln weight 1 + bias 8)
    assert plan.v_kept == 2 + 8 + 1 + 10 + 2 + 8 + 16 + 8 + 8 + 1 + 8
    Plan.loads(plan.dumps()).validate(model)                         # round-trips and checks


def test_without_a_base_other_parameters_keep_full_adam():
    model = tiny()
    plan = plan_from_partitions(model, {Q: candidate_partitions((8, 8), 2)["per head"]})
    assert all(lp.reduce is None for name, lp in plan.layers.items() if name != Q)
    assert plan.v_kept == plan.v_full - 64 + 2


def test_plan_from_partitions_trains_the_model():
    model = tiny()
    parts = {Q: candidate_partitions((8, 8), 2)["per head"], K: candidate_partitions((8, 8), 2)["per head"],
             V: candidate_partitions((8, 8))["per row"], FC: candidate_partitions((16, 8))["whole"]}
    plan = plan_from_partitions(model, parts, base=build_preset("adam-mini", model))
    opt = optimizer_from_plan(model, plan, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 10, (4, 6), generator=gen)               # (B, T)
    x, y = idx[:, :-1], idx[:, 1:]

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x).reshape(-1, 10), y.reshape(-1))

    first = float(loss().detach())
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < first - 0.1
    assert opt.state[model.attn.q.weight]["exp_avg_sq"].numel() == 2    # one v per head


def test_plan_from_partitions_rejects_unknown_names_and_partitions_of_another_size():
    model = tiny()
    with pytest.raises(ValueError, match="'attn.x.weight' is not a trainable parameter of TinyLM"):
        plan_from_partitions(model, {"attn.x.weight": candidate_partitions((8, 8))["whole"]})
    with pytest.raises(ValueError, match="covers 32 indices, the parameter has 64"):
        plan_from_partitions(model, {Q: candidate_partitions((4, 8))["whole"]})
