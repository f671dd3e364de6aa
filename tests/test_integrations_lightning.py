"""The Lightning callback against the core API: a tiny Lightning module trained by
`lightning.Trainer` with `LowmemCallback` writes the trajectory that `lowmem.capture` writes
around a plain PyTorch loop doing the same training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning")

import lowmem  # noqa: E402
from lowmem.integrations import unwrap_optimizer  # noqa: E402
from lowmem.integrations.lightning import LowmemCallback  # noqa: E402
from lowmem.snr.precision import read_precision  # noqa: E402
from lowmem.snr.trajectory import read_trajectory  # noqa: E402

STEPS, BATCH = 6, 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(16, 32), "c_proj": nn.Linear(32, 16)})
        self.head = nn.Linear(16, 11, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.mlp["c_proj"](torch.tanh(self.mlp["c_fc"](x)))
        return self.head(x)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 11, (STEPS * BATCH, 6), generator=g)
    return torch.utils.data.TensorDataset(x[:, :-1], x[:, 1:])


def _loss(net, x, y):
    return F.cross_entropy(net(x).reshape(-1, 11), y.reshape(-1))


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()

    def training_step(self, batch, _):
        return _loss(self.net, *batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_lightning_callback_writes_the_core_api_trajectory(tmp_path):
    callback = LowmemCallback(every=2, out=tmp_path / "pl.csv", precision_out=tmp_path / "pl-precision.csv",
                              precision_every=4)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        default_root_dir=str(tmp_path))
    trainer.fit(Module(), torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False))
    assert callback.capture is None

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    with lowmem.capture(opt, net, every=2, out=tmp_path / "core.csv", precision_out=tmp_path / "core-precision.csv",
                        precision_every=4):
        for x, y in torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False):
            _loss(net, x, y).backward()
            opt.step()
            opt.zero_grad()

    pl = {(s.step, s.name.removeprefix("net."), s.view, s.subset): s.snr for s in read_trajectory(tmp_path / "pl.csv")}
    core = {(s.step, s.name, s.view, s.subset): s.snr for s in read_trajectory(tmp_path / "core.csv")}
    assert set(pl) == set(core) and {k[0] for k in core} == {2, 4, 6}
    for key, value in core.items():
        assert pl[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    # the precision, passed through as well: at steps 2 and 4 only, as the core API measures it
    pl = {(s.step, s.name.removeprefix("net."), s.state, s.format): s.update_error
          for s in read_precision(tmp_path / "pl-precision.csv")}
    core = {(s.step, s.name, s.state, s.format): s.update_error
            for s in read_precision(tmp_path / "core-precision.csv")}
    assert set(pl) == set(core) and {k[0] for k in core} == {2, 4}   # the first measurement, then 4's multiples
    for key, value in core.items():
        assert pl[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_unwrap_finds_the_torch_optimizer_inside_lightnings_wrapper():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    inner = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    assert unwrap_optimizer(LightningOptimizer(inner)) is inner


def test_lightning_example_runs_the_probe_plan_train_loop(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "lightning_fit.py"
    spec = importlib.util.spec_from_file_location("lightning_fit_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "10", "--out", str(tmp_path)])
    plan = lowmem.Plan.load(result["plan"])
    plan.validate(example.GPT())                         # names as the callback saw them: the module's
    assert sorted({s.step for s in read_trajectory(tmp_path / "snr.csv")}) == [5, 10]
    assert result["adamw_bytes"] == 8 * 814_208          # the built-in GPT's parameters, by hand (README)


def test_lightning_callback_under_fsdp2_writes_the_single_process_trajectory(tmp_path):
    """Lightning's ModelParallelStrategy on 2 CPU processes, the module sharded with fully_shard:
    the callback attaches on both ranks (the measurement is collective), rank 0 writes, and the
    SNR is that of one process training on both ranks' batches (step s of the two ranks together
    takes samples 2·s·B … 2·(s+1)·B − 1, see lightning_fsdp_run.py)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "lightning_fsdp_run.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "fsdp.csv"), str(STEPS), str(BATCH // 2)],
                   check=True, timeout=600, cwd=tmp_path)
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    with lowmem.capture(opt, net, every=2, out=tmp_path / "core.csv", precision_out=tmp_path / "core-precision.csv",
                        precision_every=4):
        for x, y in torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False):
            _loss(net, x, y).backward()
            opt.step()
            opt.zero_grad()
    fsdp = {(s.step, s.name.removeprefix("net."), s.view, s.subset): s
            for s in read_trajectory(tmp_path / "fsdp.csv")}
    core = {(s.step, s.name, s.view, s.subset): s for s in read_trajectory(tmp_path / "core.csv")}
    assert set(fsdp) == set(core) and {k[0] for k in core} == {2, 4, 6}
    for key, want in core.items():
        got = fsdp[key]
        assert got.mean_sq == pytest.approx(want.mean_sq, rel=1e-4), key
        assert got.snr == pytest.approx(want.snr, rel=1e-4 + 1e-6 * want.snr), key


def test_lightning_trains_with_the_plans_optimizer_as_a_hand_written_loop(tmp_path):
    plan = lowmem.build_preset("eve", Net())
    plan.save(tmp_path / "plan.json")

    class Planned(Module):
        def configure_optimizers(self):
            return lowmem.optimizer_from_plan(self.net, str(tmp_path / "plan.json"), lr=1e-2, weight_decay=0.1)

    module = Planned()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False))

    torch.manual_seed(0)
    net = Net()
    opt = lowmem.SlimAdam(net, plan=plan, lr=1e-2, weight_decay=0.1)
    for x, y in torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False):
        _loss(net, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert type(trainer.optimizers[0]) is lowmem.SlimAdam
    for (name, a), b in zip(module.net.named_parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
