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
from lowmem.snr.trajectory import read_trajectory

STEPS, BATCH, WIDTH, HEADS = 4, 8, 8, 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = HEADS
        self.q = nn.Linear(WIDTH, WIDTH, bias=False)
        self.k = nn.Linear(WIDTH, WIDTH, bias=False)
        self.v = nn.Linear(WIDTH, WIDTH, bias=False)
        self.o = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (m(x).view(B, T, HEADS, C // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


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


def train(model, opt, rows=slice(None), capture_to=None):
    cap = lowmem.capture(opt, model, every=2, out=capture_to) if capture_to else None
    if cap is not None:
        cap.attach()
    try:
        for step in range(STEPS):
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


# -- FSDP2 ------------------------------------------------------------------------------------------

ENGINE = ("slimadam", "eve", "adam-mini", "adam-mini-paper", "adalayer")   # the v-averaging engine
OTHERS = ("adamem", "adafactor-momentum")                                  # not sharded yet: refused


class EvenNet(Net):
    """Net with every dim 0 even, so 2 ranks hold equal shards (and Q's 2 heads one each)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, WIDTH)
        self.head = nn.Linear(WIDTH, 12, bias=False)


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        messages, params = {}, {}
        for name in (*ENGINE, *OTHERS):
            torch.manual_seed(0)
            model = EvenNet()
            fully_shard(model)
            try:
                opt = make_optimizer(name, model, 1e-2, SETTINGS)
            except NotImplementedError as e:
                messages[name] = str(e)
                continue
            half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            train(model, opt, half)
            params[name] = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
        torch.manual_seed(0)
        model = EvenNet()
        fully_shard(model)
        try:
            lowmem.capture(torch.optim.AdamW(model.parameters()), model)
        except NotImplementedError as e:
            messages["capture"] = str(e)
        if rank == 0:
            torch.save({"messages": messages, "params": params}, os.path.join(out, "fsdp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2")
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_fsdp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return torch.load(out / "fsdp.pt", weights_only=True)


@pytest.mark.parametrize("name", ENGINE)
def test_fsdp2_parameters_equal_a_single_process_run(fsdp_run, name):
    """Means over sharded dims (Eve's rows of the vocabulary-sharded head, Adam-mini's per-head
    and per-tensor means) are exact across the 2 shards."""
    torch.manual_seed(0)
    model = EvenNet()
    torch.manual_seed(0)
    train(model, make_optimizer(name, model, 1e-2, SETTINGS))
    got = fsdp_run["params"][name]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=2e-5, atol=2e-6, msg=f"{name}: {k}")


def test_fsdp2_refuses_what_is_not_sharded_yet_by_name(fsdp_run):
    messages = fsdp_run["messages"]
    for name in (*OTHERS, "capture"):
        assert "'emb.weight' is a DTensor sharded as (Shard(dim=0),)" in messages[name], (name, messages.get(name))
    assert not set(messages) & set(ENGINE)
