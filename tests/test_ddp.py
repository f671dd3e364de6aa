"""DDP with 2 CPU processes (gloo): every optimizer, unchanged, gives the parameters of a
single-process run on the whole batch, and SNR captured on one rank equals the single-process
SNR (DDP keeps v replicated, so one rank's v is the whole v)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import lowmem
from lowmem.compare import OPTIMIZERS, SweepSettings, make_optimizer
from lowmem.integrations import captures_here
from lowmem.snr.trajectory import read_trajectory
from tiny_models import HEADS, WIDTH, Attention

STEPS, BATCH = 4, 12      # BATCH divides among 2, 3 and 4 ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.c_proj = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, WIDTH)
        self.ln = nn.LayerNorm(WIDTH)
        self.attn = Attention()
        self.mlp = MLP()
        self.head = nn.Linear(WIDTH, 11, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.attn(self.ln(x))
        x = x + self.mlp(x)
        return self.head(x)


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 11, (BATCH, 6), generator=g)
    return x[:, :-1], x[:, 1:]


def loss_of(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(model, opt, rows=slice(None), capture_to=None, steps=range(STEPS)):
    cap = lowmem.capture(opt, model, every=2, out=capture_to) if capture_to else None
    if cap is not None:
        cap.attach()
    try:
        for step in steps:
            x, y = batch(step)
            loss_of(model, x[rows], y[rows]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        if cap is not None:
            cap.close()


SETTINGS = SweepSettings(steps=STEPS)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        base = Net()
        for name in OPTIMIZERS:
            model = nn.parallel.DistributedDataParallel(Net())
            model.module.load_state_dict(base.state_dict())
            torch.manual_seed(0)
            opt = make_optimizer(name, model, 1e-2, SETTINGS)
            half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            # SNR is captured on rank 0 only: nothing collective happens in a measurement.
            train(model, opt, half, capture_to=os.path.join(out, f"{name}.csv") if rank == 0 and name == "adamw" else None)
            if rank == 0:
                torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()},
                           os.path.join(out, f"{name}.pt"))
        with open(os.path.join(out, f"captures_here.{rank}"), "w") as f:
            f.write(str(captures_here(model, is_main=rank == 0)))
        dist.barrier()     # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_ddp_parameters_equal_a_single_process_run(ddp_run, name):
    torch.manual_seed(0)
    model = Net()
    torch.manual_seed(0)
    train(model, make_optimizer(name, model, 1e-2, SETTINGS))
    got = torch.load(ddp_run / f"{name}.pt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=2e-5, atol=2e-6, msg=f"{name}: {k}")


def test_snr_captured_on_one_rank_equals_the_single_process_snr(ddp_run, tmp_path):
    torch.manual_seed(0)
    model = Net()
    torch.manual_seed(0)
    train(model, make_optimizer("adamw", model, 1e-2, SETTINGS), capture_to=tmp_path / "single.csv")
    single = {(s.step, s.name, s.view, s.subset): s.snr for s in read_trajectory(tmp_path / "single.csv")}
    ddp = {(s.step, s.name, s.view, s.subset): s.snr for s in read_trajectory(ddp_run / "adamw.csv")}
    assert set(ddp) == set(single) and len(single) > 20      # DDP's "module." prefix is normalised away
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_integrations_capture_on_the_main_process_under_ddp_and_on_every_rank_under_fsdp2(ddp_run, fsdp_run):
    assert [(ddp_run / f"captures_here.{r}").read_text() for r in range(2)] == ["True", "False"]
    world, out, _ = fsdp_run
    assert [(out / f"captures_here.{r}").read_text() for r in range(world)] == ["True"] * world


# -- FSDP2 ------------------------------------------------------------------------------------------


class EvenNet(Net):
    """Net with every dim 0 even, so 2 ranks hold equal shards (and Q's 2 heads one each)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, WIDTH)
        self.head = nn.Linear(WIDTH, 12, bias=False)


class OddNet(Net):
    """Net with a 13-token vocabulary: on 3 ranks the shards are uneven (5, 5, 3 rows), and each
    rank's 3 rows of Q and K cut their 4-row heads; and a one-row gate, of which every rank but
    the first holds no rows."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, WIDTH)
        self.gate = nn.Linear(WIDTH, 1, bias=False)           # (1, WIDTH)
        self.head = nn.Linear(WIDTH, 13, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        x = x * torch.sigmoid(self.gate(x))                  # (B, T, WIDTH) * (B, T, 1)
        x = x + self.attn(self.ln(x))
        x = x + self.mlp(x)
        return self.head(x)


class FusedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = HEADS
        # q, k, v parts along dim 0; no bias: the k bias has no gradient but round-off, which Adam
        # would turn into full-size steps that differ between any two summation orders
        self.c_attn = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.c_proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class FusedNet(EvenNet):
    """A GPT-2-style fused q/k/v projection, whose plans keep `v` per part (a flat state)."""

    def __init__(self):
        super().__init__()
        self.attn = FusedAttention()


MODELS = {"even": EvenNet, "odd": OddNet, "fused": FusedNet}
FSDP_RUNS = {2: ("even", "fused"), 3: ("odd", "fused"), 4: ("odd",)}     # world size -> models (4: HSDP)


def _fsdp_model(kind: str, shard: bool):
    """`kind` built from seed 0; sharded with fully_shard, and on 4 ranks as HSDP: 2 replicas
    of 2 shards each (placements (Replicate(), Shard(0)))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = MODELS[kind]()
    if shard:
        hsdp = dist.get_world_size() == 4
        fully_shard(model, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if hsdp else None)
    return model


def _gather(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _resumed(kind: str, rows, shard: bool, first: str = "slimadam") -> dict:
    """Train 2 steps with `first`, then a new model and a SlimAdam loaded from the checkpoints
    for 2 more: a state_dict round trip (or, with AdamW first, AdamW's v averaged per plan)."""
    model = _fsdp_model(kind, shard)
    opt = make_optimizer(first, model, 1e-2, SETTINGS)
    train(model, opt, rows, steps=range(2))
    model2 = _fsdp_model(kind, shard)
    model2.load_state_dict(model.state_dict())
    opt2 = make_optimizer("slimadam", model2, 1e-2, SETTINGS)
    opt2.load_state_dict(opt.state_dict())
    train(model2, opt2, rows, steps=range(2, STEPS))
    return _gather(model2)


def _plan_optimizer(model, path):
    return lowmem.optimizer_from_plan(model, path, lr=1e-2, betas=(0.9, 0.95))


def _plan_on_one_process(kind: str, path) -> lowmem.Plan:
    """A plan measured and built in one process, generous enough (threshold 0.3, fewest entries
    kept) to average `v` across shards, within heads that shards cut, and within fused parts."""
    model = _fsdp_model(kind, shard=False)
    csv = path.with_suffix(".csv")
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), capture_to=csv)
    plan = lowmem.build_plan(model, lowmem.SnrTrajectory.read(csv), threshold=0.3, prefer="compression")
    plan.save(path)
    return plan


DCP_OPTIMIZERS = ("slimadam", "adamem", "adafactor-momentum")
REFERENCE_OPTIMIZERS = ("slimadam", "eve", "adam-mini", "adalayer")   # the plan engine's presets


def _compressed_v(opt) -> dict:
    """``{name: exp_avg_sq}`` from the state dict of the parameters whose v is averaged (none
    for optimizers other than the plan engine's)."""
    if not hasattr(opt, "_layouts"):
        return {}
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    return {opt._names[p]: sd["state"][i]["exp_avg_sq"].clone() for i, p in enumerate(params)
            if opt._layouts[p].compressed}


def _dcp_round_trip(kind: str, name: str, rows, path: str) -> tuple[dict, dict]:
    """`name` for 2 steps, saved with torch.distributed.checkpoint, loaded into a new model and
    optimizer, 2 more steps: (the state dict's v after 2 steps, the final parameters)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp_model(kind, shard=True)
    opt = make_optimizer(name, model, 1e-2, SETTINGS)
    train(model, opt, rows, steps=range(2))
    whole_v = _compressed_v(opt)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    model2 = _fsdp_model(kind, shard=True)
    opt2 = make_optimizer(name, model2, 1e-2, SETTINGS)
    msd2, osd2 = get_state_dict(model2, opt2)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    train(model2, opt2, rows, steps=range(2, STEPS))
    return whole_v, _gather(model2)


FORMATS = ("m=int8,v=int8", "m=int4,v=bf16")   # quantized m and v (full-Adam layers), packed 4-bit, bf16


def _formats_run(kind: str, fmt: str, rows, shard: bool, plan_path, resume: bool = False) -> dict:
    """The one-process plan with states stored in `fmt` (every matrix of these small models
    quantized, OddNet's one-row gate too, of which ranks but the first hold no rows: the size
    floors lowered), 4 steps, or 2 and a state_dict round trip and 2 more."""
    from lowmem.compress import formats
    from lowmem.compress.optim import ReducedAdamW

    formats.MIN_QUANTIZED_NUMEL = formats.MIN_QUANTIZED_ROW = WIDTH
    plan = lowmem.Plan.load(plan_path)
    model = _fsdp_model(kind, shard)
    opt = ReducedAdamW(model, plan, lr=1e-2, betas=(0.9, 0.95), state_format=fmt)
    if not resume:
        train(model, opt, rows)
        return _gather(model)
    train(model, opt, rows, steps=range(2))
    model2 = _fsdp_model(kind, shard)
    model2.load_state_dict(model.state_dict())
    opt2 = ReducedAdamW(model2, plan, lr=1e-2, betas=(0.9, 0.95), state_format=fmt)
    opt2.load_state_dict(opt.state_dict())
    train(model2, opt2, rows, steps=range(2, STEPS))
    return _gather(model2)


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        result = {"params": {}, "from_plan": {}, "resumed": {}, "from_adamw": {}, "whole_v": {}, "dcp": {},
                  "formats": {}, "formats_resumed": {}, "reference": {}}
        for kind in FSDP_RUNS[world]:
            for name in OPTIMIZERS:
                model = _fsdp_model(kind, shard=True)
                torch.manual_seed(0)
                opt = make_optimizer(name, model, 1e-2, SETTINGS)
                train(model, opt, rows, capture_to=os.path.join(out, f"{kind}.csv") if name == "adamw" else None)
                result["params"][kind, name] = _gather(model)
            for name in REFERENCE_OPTIMIZERS:   # the readable backend's sharded branch
                model = _fsdp_model(kind, shard=True)
                torch.manual_seed(0)
                opt = make_optimizer(name, model, 1e-2, SETTINGS)
                for g in opt.param_groups:
                    g["backend"] = "reference"
                train(model, opt, rows)
                ran = sorted({opt.backend_of(p).name for g in opt.param_groups for p in g["params"]})
                result["reference"][kind, name] = (_gather(model), ran)
            model = _fsdp_model(kind, shard=True)
            train(model, _plan_optimizer(model, os.path.join(out, f"{kind}.plan.json")), rows)
            result["from_plan"][kind] = _gather(model)
            result["resumed"][kind] = _resumed(kind, rows, shard=True)
            for name in DCP_OPTIMIZERS:
                result["whole_v"][kind, name], result["dcp"][kind, name] = _dcp_round_trip(
                    kind, name, rows, os.path.join(out, f"dcp-{kind}-{name}"))
            result["from_adamw"][kind] = _resumed(kind, rows, shard=True, first="adamw")
            for fmt in FORMATS:
                plan_path = os.path.join(out, f"{kind}.plan.json")
                result["formats"][kind, fmt] = _formats_run(kind, fmt, rows, True, plan_path)
                result["formats_resumed"][kind, fmt] = _formats_run(kind, fmt, rows, True, plan_path, resume=True)
        # A layout lowmem does not take (sharded along dim 1, as tensor parallelism does).
        mesh = init_device_mesh("cpu", (world,))
        odd = nn.Linear(WIDTH, 4)
        odd.weight = nn.Parameter(distribute_tensor(odd.weight.detach(), mesh, [Shard(1)]))
        odd.bias.requires_grad_(False)
        result["refused"] = {}
        for what, build in (("slimadam", lambda: make_optimizer("slimadam", odd, 1e-2, SETTINGS)),
                            ("adamem", lambda: make_optimizer("adamem", odd, 1e-2, SETTINGS)),
                            ("capture", lambda: lowmem.capture(torch.optim.AdamW([odd.weight]), odd))):
            try:
                build()
            except NotImplementedError as e:
                result["refused"][what] = str(e)
        with open(os.path.join(out, f"captures_here.{rank}"), "w") as f:
            f.write(str(captures_here(_fsdp_model("even", shard=True), is_main=rank == 0)))
        if rank == 0:
            torch.save(result, os.path.join(out, "fsdp.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(FSDP_RUNS))
def fsdp_run(request, tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2")
    world = request.param
    out = tmp_path_factory.mktemp(f"fsdp{world}")
    for kind in FSDP_RUNS[world]:
        _plan_on_one_process(kind, out / f"{kind}.plan.json")
    mp.start_processes(_fsdp_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True,
                       start_method="spawn")
    return world, out, torch.load(out / "fsdp.pt", weights_only=True)


def _single(kind: str, name: str, capture_to=None) -> dict:
    model = _fsdp_model(kind, shard=False)
    torch.manual_seed(0)
    train(model, make_optimizer(name, model, 1e-2, SETTINGS), capture_to=capture_to)
    return _gather(model)


def _assert_params_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {k}\n{m}")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_parameters_equal_a_single_process_run(fsdp_run, name):
    """Every optimizer on row-sharded parameters: means across shards (Eve's rows of the sharded
    vocabulary, column means, per-head means of heads that a shard cuts, fused q/k/v parts) from
    all-reduced partial sums; AdaMeM and Adafactor on gathered gradients."""
    world, _, result = fsdp_run
    for kind in FSDP_RUNS[world]:
        _assert_params_equal(result["params"][kind, name], _single(kind, name), f"{name} on {kind}, {world} ranks")


def test_fsdp2_reference_backend_equals_a_single_process_run(fsdp_run):
    """The readable backend, asked for by a group's ``backend``, serves sharded buckets too (its
    own means across shards, not the foreach backend's): the same parameters as one process."""
    world, _, result = fsdp_run
    for kind in FSDP_RUNS[world]:
        for name in REFERENCE_OPTIMIZERS:
            params, ran = result["reference"][kind, name]
            assert ran == ["reference"], (kind, name, ran)
            _assert_params_equal(params, _single(kind, name), f"{name}, reference backend, on {kind}, {world} ranks")


def test_fsdp2_captured_snr_equals_the_single_process_snr(fsdp_run, tmp_path):
    world, out, _ = fsdp_run
    for kind in FSDP_RUNS[world]:
        _single(kind, "adamw", capture_to=tmp_path / f"{kind}.csv")
        single = {(s.step, s.name, s.view, s.subset): s for s in read_trajectory(tmp_path / f"{kind}.csv")}
        sharded = {(s.step, s.name, s.view, s.subset): s for s in read_trajectory(out / f"{kind}.csv")}
        assert set(sharded) == set(single) and len(single) > 40, kind
        for key, want in single.items():
            got = sharded[key]
            assert got.mean_sq == pytest.approx(want.mean_sq, rel=1e-5, nan_ok=True), (kind, key)
            # var is a difference of near-equal float32 numbers where v hardly varies: its
            # round-off is relative to mean², and so is the SNR's, times the SNR itself
            assert got.var == pytest.approx(want.var, rel=1e-4, abs=1e-6 * want.mean_sq, nan_ok=True), (kind, key)
            assert got.snr == pytest.approx(want.snr, rel=1e-4 + 1e-6 * want.snr, nan_ok=True), (kind, key)


def test_fsdp2_applies_a_plan_built_in_one_process(fsdp_run):
    world, out, result = fsdp_run
    for kind in FSDP_RUNS[world]:
        plan = lowmem.Plan.load(out / f"{kind}.plan.json")
        reduced = [lp for lp in plan.layers.values() if lp.compressed]
        assert len(reduced) >= 5 and any(lp.parts for lp in reduced) == (kind == "fused"), kind
        model = _fsdp_model(kind, shard=False)
        train(model, _plan_optimizer(model, out / f"{kind}.plan.json"))
        _assert_params_equal(result["from_plan"][kind], _gather(model), f"one-process plan on {kind}")


def test_fsdp2_checkpoint_round_trip_and_adamw_checkpoint_equal_a_single_process_run(fsdp_run):
    world, _, result = fsdp_run
    rows = slice(None)
    for kind in FSDP_RUNS[world]:
        _assert_params_equal(result["resumed"][kind], _resumed(kind, rows, shard=False), f"resumed {kind}")
        _assert_params_equal(result["from_adamw"][kind], _resumed(kind, rows, shard=False, first="adamw"),
                             f"AdamW checkpoint into SlimAdam, {kind}")
        # The round trip is exact: the resumed run equals the uninterrupted one bit for bit.
        for k, v in result["params"][kind, "slimadam"].items():
            assert torch.equal(result["resumed"][kind][k], v), (kind, k)


def test_fsdp2_states_in_storage_formats_equal_a_single_process_run(fsdp_run, monkeypatch):
    """int8/int4 blocks run along rows, so each rank quantizes its rows as one process does:
    sharded runs (also resumed from a sharded state dict) equal the one-process run, up to the
    round-off of means across shards."""
    from lowmem.compress import formats

    monkeypatch.setattr(formats, "MIN_QUANTIZED_NUMEL", WIDTH)
    monkeypatch.setattr(formats, "MIN_QUANTIZED_ROW", WIDTH)
    world, out, result = fsdp_run
    for kind in FSDP_RUNS[world]:
        for fmt in FORMATS:
            want = _formats_run(kind, fmt, slice(None), False, out / f"{kind}.plan.json")
            _assert_params_equal(result["formats"][kind, fmt], want, f"{fmt} on {kind}, {world} ranks")
            _assert_params_equal(result["formats_resumed"][kind, fmt], want, f"resumed {fmt} on {kind}, {world} ranks")


def test_fsdp2_state_dict_holds_the_single_process_v_and_survives_distributed_checkpoint(fsdp_run):
    """The sharded optimizer's state dict has the whole single-process `exp_avg_sq` (the same on
    every rank, so DCP saves it right and a checkpoint fits any number of ranks), and a
    torch.distributed.checkpoint save/load resumes bit for bit."""
    world, _, result = fsdp_run
    for kind in FSDP_RUNS[world]:
        model = _fsdp_model(kind, shard=False)
        opt = make_optimizer("slimadam", model, 1e-2, SETTINGS)
        train(model, opt, steps=range(2))
        want = _compressed_v(opt)
        assert want.keys() == result["whole_v"][kind, "slimadam"].keys() and len(want) >= 5
        for name, v in want.items():
            torch.testing.assert_close(result["whole_v"][kind, "slimadam"][name], v, rtol=1e-5, atol=1e-12, msg=name)
        for name in DCP_OPTIMIZERS:     # AdaMeM and Adafactor keep rank-local statistics as DTensors
            for k, v in result["params"][kind, name].items():
                assert torch.equal(result["dcp"][kind, name][k], v), (kind, name, k)


def test_fsdp2_layouts_other_than_row_sharding_are_refused_by_name(fsdp_run):
    _, _, result = fsdp_run
    for what in ("slimadam", "adamem", "capture"):
        message = result["refused"].get(what, "")
        assert "'weight' is a DTensor sharded as (Shard(dim=1),)" in message, (what, message)


def test_fsdp_example_equals_the_same_loop_in_one_process(tmp_path):
    """examples/fsdp_train.py on 2 ranks: the plan it builds from its sharded capture and its
    losses are those of the same probe → plan → train loop in one process on whole batches."""
    import subprocess
    import sys
    from pathlib import Path

    from lowmem.examples import shakespeare

    steps, out = 20, tmp_path / "fsdp"
    script = Path(__file__).parents[1] / "examples" / "fsdp_train.py"
    subprocess.run([sys.executable, str(script), "--world", "2", "--steps", str(steps), "--out", str(out),
                    "--results", str(tmp_path / "r.pt")], check=True, timeout=600)
    got = torch.load(tmp_path / "r.pt", weights_only=True)

    def loop(opt_for, capture_to=None):
        torch.manual_seed(0)
        model = shakespeare.build_model()
        opt = opt_for(model)
        cap = lowmem.capture(opt, model, every=5, out=capture_to) if capture_to else None
        for step in range(steps):
            loss = shakespeare.loss_fn(model, shakespeare.get_batch(step))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cap is not None:
            cap.close()
        return model, loss.item()

    probe, adamw_loss = loop(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0),
                             capture_to=tmp_path / "snr.csv")
    plan = lowmem.build_plan(probe, lowmem.SnrTrajectory.read(tmp_path / "snr.csv"))
    sharded_plan = lowmem.Plan.load(out / "plan.json")
    assert {n: (lp.view, lp.reduce) for n, lp in sharded_plan.layers.items()} == \
        {n: (lp.view, lp.reduce) for n, lp in plan.layers.items()}
    assert plan.summary["v_saved"] > 0.2
    _, plan_loss = loop(lambda m: lowmem.optimizer_from_plan(m, plan, lr=1e-3, weight_decay=0.0))
    assert got["adamw_loss"] == pytest.approx(adamw_loss, rel=1e-4)
    assert got["plan_loss"] == pytest.approx(plan_loss, rel=1e-4)
    # AdamW's state on rank 0, which holds ceil(rows / 2) of every parameter: 8 bytes per entry
    rank0 = sum(-(-p.shape[0] // 2) * p[0].numel() for p in probe.parameters())
    assert got["adamw_bytes"] == 8 * rank0
    assert got["plan_bytes"] < got["adamw_bytes"]


# -- FSDP2: the error of each state format, from per-rank partial sums ------------------------------


class WideNet(nn.Module):
    """Quantizable weights that 3 ranks shard unevenly: (26, 300) as 9, 9, 8 rows (int8 rows of two
    blocks, the last short); (200, 26) as 67, 67, 66; (2, 2100) as 1, 1, 0 rows, so the last rank
    holds none of it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(300, 26)
        self.out = nn.Linear(26, 200)
        self.wide = nn.Linear(2100, 2, bias=False)

    def forward(self, x):
        y = self.out(torch.tanh(self.fc(x)))                                 # (B, 200)
        return y, self.wide(torch.cat([y] * 10 + [x[:, :100]], dim=1))        # (B, 2)


def _precision_run(rows=slice(None), shard=False, path=None, steps=3):
    from lowmem.compress import formats

    floor, formats.MIN_QUANTIZED_ROW = formats.MIN_QUANTIZED_ROW, 1   # (200, 26) quantizable: the sums are checked
    try:
        return _precision_samples(rows, shard, path, steps)
    finally:
        formats.MIN_QUANTIZED_ROW = floor


def _precision_samples(rows, shard, path, steps):
    torch.manual_seed(0)
    model = WideNet()
    if shard:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    with lowmem.capture(opt, model, every=1, precision=True, precision_out=path) as cap:
        for step in range(steps):
            x = torch.randn(BATCH, 300, generator=torch.Generator().manual_seed(step))[rows]
            y, g = model(x)
            (y.pow(2).mean() + g.pow(2).mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return cap.precision_samples


def _precision_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        samples = _precision_run(rows, shard=True, path=os.path.join(out, "precision.csv") if rank == 0 else None)
        torch.save([s.__dict__ for s in samples], os.path.join(out, f"precision.{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:lowmem. .* unknown layer types:UserWarning")
def test_fsdp2_state_format_errors_equal_the_single_process_errors(tmp_path):
    """Every rank quantizes its own rows and the errors come from all-reduced partial sums: each
    rank records the single-process errors, and only rank 0 writes the file."""
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2")
    from lowmem.compress.formats import quantizable
    from lowmem.snr.precision import read_precision

    world = 3
    mp.start_processes(_precision_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    single = {(s.step, s.name, s.state, s.format): s for s in _precision_run()}
    assert len(single) == 3 * (5 + 5 + 5 + 2 + 2)          # 3 steps; 3 quantizable weights, 2 biases
    for rank in range(world):
        sharded = {(s["step"], s["name"], s["state"], s["format"]): s
                   for s in torch.load(tmp_path / f"precision.{rank}.pt", weights_only=False)}
        assert set(sharded) == set(single), rank
        for key, want in single.items():
            got = sharded[key]
            # The two runs' states differ by the round-off of the sharded gradient average, which can
            # flip a rounding: a few in thousands of entries of a weight, one in the 26 of a bias.
            rel = 1e-3 if quantizable(want.shape) else 2e-2
            assert got["state_error"] == pytest.approx(want.state_error, rel=rel, abs=1e-7), (rank, key)
            assert got["update_error"] == pytest.approx(want.update_error, rel=rel, abs=1e-7), (rank, key)
    assert {(s.step, s.name, s.state, s.format) for s in read_precision(tmp_path / "precision.csv")} == set(single)


# -- an interleaved fused Q/K/V under FSDP2 ----------------------------------------------------
def _neox():
    import warnings

    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))


def _neox_worker(rank: int, world: int, port: int, out: str, split_plan: str) -> None:
    """On a row-sharded GPT-NeoX: what the resolver reads, a preset optimizer's step, the SNR
    capture, and the plan made unsharded (with the split) offered to the sharded optimizer."""
    from torch.distributed.fsdp import fully_shard

    from lowmem.layers import resolve_layers
    from lowmem.snr.capture import capture
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        name = "gpt_neox.layers.0.attention.query_key_value.weight"
        model = _neox()
        fully_shard(model)
        info = resolve_layers(model, warn=False)[name]
        opt = lowmem.SlimAdam(model, lr=1e-3)
        cap = capture(opt, model, every=1)
        for step in range(2):
            opt.zero_grad()
            model(torch.arange(step, step + 12).view(1, 12) % 64).logits.square().mean().backward()
            opt.step()
        cap.close()
        views = sorted({s.view.name for s in cap.samples if s.name == name})
        try:
            lowmem.optimizer_from_plan(model, split_plan, lr=1e-3)
            refused = ""
        except ValueError as e:
            refused = str(e)
        torch.save({"parts": info.parts, "layout": info.qkv_layout, "views": views, "refused": refused},
                   os.path.join(out, f"neox.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_keeps_an_interleaved_projection_whole_and_refuses_a_split_plan_with_a_reason(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2")
    split = lowmem.build_preset("slimadam-rules", _neox())
    assert split.layers["gpt_neox.layers.0.attention.query_key_value.weight"].parts   # unsharded: split
    split.save(tmp_path / "split.json")
    world = 2
    mp.start_processes(_neox_worker, args=(world, _free_port(), str(tmp_path), str(tmp_path / "split.json")),
                       nprocs=world, join=True, start_method="spawn")
    for rank in range(world):
        got = torch.load(tmp_path / f"neox.{rank}.pt")
        assert (got["parts"], got["layout"]) == (None, "per_head")     # sharded: kept whole, measured whole
        assert got["views"] == ["raw"]
        assert "interleaved" in got["refused"] and "query_key_value" in got["refused"]
