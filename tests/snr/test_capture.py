"""SNR capture from a live optimizer, its trajectory file, and the trajectory reader."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowmem
from lowmem.snr import (NoAdamStateError, Sample, SnrCapture, SnrTrajectory, TrajectoryError, TrajectoryWriter,
                        ViewLabel, read_trajectory)

D, H, VOCAB, SEEN = 128, 4, 32, 24      # width, heads, vocabulary, tokens that ever occur
B, T = 4, 8
HEADER_LINE = "step,name,shape,view,subset,snr,mean_sq,var"


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = H
        self.q = nn.Linear(D, D, bias=False)
        self.k = nn.Linear(D, D, bias=False)
        self.v = nn.Linear(D, D, bias=False)
        self.c_proj = nn.Linear(D, D, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q = self.q(x).view(b, t, H, c // H).transpose(1, 2)       # (B, H, T, hd)
        k = self.k(x).view(b, t, H, c // H).transpose(1, 2)
        v = self.v(x).view(b, t, H, c // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))     # (B, T, C)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.attn = Attention()
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx):
        return self.lm_head(self.ln_f(self.wte(idx) + self.attn(self.wte(idx))))


def get_batch(step):
    g = torch.Generator().manual_seed(step)
    chunk = torch.randint(SEEN, (B, T + 1), generator=g)           # rows SEEN.. of wte never get a gradient
    return chunk[:, :-1], chunk[:, 1:]


def make(opt_cls=torch.optim.AdamW, **opt_kwargs):
    torch.manual_seed(0)
    model = TinyLM()
    return model, opt_cls(model.parameters(), lr=1e-2, **opt_kwargs)


def backward(model, step):
    x, y = get_batch(step)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    return loss


def train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        backward(model, i)
        opt.step()
        opt.zero_grad()


def record_exp_avg_sq(model, opt):
    """Our own post-hook, registered before capture's: a float64 copy of every v, by state step."""
    names = {p: n for n, p in model.named_parameters()}
    snapshots = {}

    def hook(optimizer, args, kwargs):
        step = int(optimizer.state[model.wte.weight]["step"])
        snapshots[step] = {names[p]: st["exp_avg_sq"].double().numpy().copy()
                           for p, st in optimizer.state.items()}

    opt.register_step_post_hook(hook)
    return snapshots


def expected_samples(vs, reference_snr):
    """{(name, view, subset): (snr, mean_sq, var)} from the views the design names, computed here."""
    out = {}
    for name, v in vs.items():
        views = {ViewLabel("raw", v.shape): v}
        if name in ("attn.q.weight", "attn.k.weight", "attn.v.weight"):
            views[ViewLabel("heads", (H, D // H, D))] = v.reshape(H, D // H, D)      # out -> (head, out)
        for label, x in views.items():
            for k in range(1, x.ndim + 1):
                for subset in combinations(range(x.ndim), k):
                    out[(name, label, subset)] = reference_snr(x, subset)
    return out


def assert_samples_match(samples, vs, reference_snr):
    want = expected_samples(vs, reference_snr)
    got = {(s.name, s.view, s.subset): (s.snr, s.mean_sq, s.var) for s in samples}
    assert set(got) == set(want)
    for key, values in want.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-4, err_msg=str(key))
    shapes = {s.name: s.shape for s in samples}
    assert shapes == {name: v.shape for name, v in vs.items()}


def same_samples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.step, x.name, x.shape, x.view, x.subset) == (y.step, y.name, y.shape, y.view, y.subset)
        np.testing.assert_array_equal([x.snr, x.mean_sq, x.var], [y.snr, y.mean_sq, y.var])


MODES = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.mark.parametrize("mode", list(MODES))
def test_measures_every_third_step_and_matches_numpy_on_exp_avg_sq(mode, tmp_path, reference_snr):
    model, opt = make(**MODES[mode])
    snapshots = record_exp_avg_sq(model, opt)
    with lowmem.capture(opt, model, every=3, out=tmp_path / "snr.csv") as cap:
        train(model, opt, 10)
    assert cap.measured_steps == [3, 6, 9]
    assert sorted({s.step for s in cap.samples}) == [3, 6, 9]
    # Never-seen embedding rows keep v = 0, so the 0/0 slices are really there to be left out.
    assert not snapshots[9]["wte.weight"][SEEN:].any()
    for step in (3, 6, 9):
        assert_samples_match([s for s in cap.samples if s.step == step], snapshots[step], reference_snr)


def test_head_split_views_are_measured_for_q_k_v_only(reference_snr):
    model, opt = make()
    with lowmem.capture(opt, model, every=1) as cap:
        train(model, opt, 1)
    views = {}
    for s in cap.samples:
        views.setdefault(s.name, {}).setdefault(str(s.view), []).append(",".join(map(str, s.subset)))
    heads = f"heads:{H}x{D // H}x{D}"
    for name in ("attn.q.weight", "attn.k.weight", "attn.v.weight"):
        assert views[name] == {"raw:128x128": ["0", "1", "0,1"],
                               heads: ["0", "1", "2", "0,1", "0,2", "1,2", "0,1,2"]}
    for name in ("wte.weight", "attn.c_proj.weight", "lm_head.weight"):
        assert list(views[name]) == ["raw:" + "x".join(map(str, model.get_parameter(name).shape))]


def test_iteration_without_optimizer_step_does_not_advance_the_count(reference_snr):
    model, opt = make()
    snapshots = record_exp_avg_sq(model, opt)
    with lowmem.capture(opt, model, every=3) as cap:
        for i in range(12):
            backward(model, i)
            if i not in (1, 4):             # e.g. gradient accumulation or a skipped batch
                opt.step()
            opt.zero_grad()
    assert int(opt.state[model.wte.weight]["step"]) == 10
    assert cap.measured_steps == [3, 6, 9]
    assert_samples_match([s for s in cap.samples if s.step == 6], snapshots[6], reference_snr)


def _train_with_scaler(model, opt, iterations, inf_at):
    scaler = torch.amp.GradScaler("cpu")
    for i in range(iterations):
        x, y = get_batch(i)
        scaler.scale(F.cross_entropy(model(x).flatten(0, 1), y.flatten())).backward()
        if i in inf_at:
            model.attn.q.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


@pytest.mark.parametrize("mode", list(MODES))
def test_amp_skipped_step_is_not_counted_nor_measured_twice(mode):
    # At iteration 3 the state step is 3 (measured); the inf step leaves it at 3. The fused kernel
    # still fires the hook, the others skip `step()` altogether.
    model, opt = make(**MODES[mode])
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(int(o.state[model.wte.weight]["step"])))
    with lowmem.capture(opt, model, every=3) as cap:
        _train_with_scaler(model, opt, 11, inf_at={3})
    assert int(opt.state[model.wte.weight]["step"]) == 10
    assert calls.count(3) == (2 if mode == "fused" else 1)
    assert cap.measured_steps == [3, 6, 9]


class _CountedStep:
    """A step read through `int()`, counted: stands in for a device tensor (a host sync)."""

    def __init__(self, step, reads):
        self.step, self.reads = step, reads

    def __int__(self):
        self.reads.append(int(self.step))
        return int(self.step)


class DeviceStepCapture(SnrCapture):
    """Treats the CPU step as device-resident, to run the no-sync step prediction on CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []

    def _state_step(self):
        found = super()._state_step()
        return None if found is None else (_CountedStep(found[0], self.reads), True)


@pytest.mark.parametrize("device_step", [False, True], ids=["cpu_step", "device_step"])
def test_capture_attached_after_steps_counts_from_the_state_step(device_step, reference_snr):
    model, opt = make()
    snapshots = record_exp_avg_sq(model, opt)
    train(model, opt, 2)
    cls = DeviceStepCapture if device_step else SnrCapture
    with cls(opt, model, every=3).attach() as cap:
        train(model, opt, 8, start=2)                 # state steps 3 … 10
    assert cap.measured_steps == [3, 6, 9]
    assert_samples_match([s for s in cap.samples if s.step == 3], snapshots[3], reference_snr)
    if device_step:
        assert len(cap.reads) < 8                     # not a host sync every step


def test_device_step_prediction_survives_amp_skips_and_reattach():
    model, opt = make(fused=True)
    cap = DeviceStepCapture(opt, model, every=3).attach()
    _train_with_scaler(model, opt, 11, inf_at={3, 5})   # 11 hook calls, state step 9
    cap.detach()
    train(model, opt, 2, start=11)                      # state step 11, unseen by the capture
    cap.attach()
    train(model, opt, 4, start=13)                      # state steps 12 … 15
    cap.close()
    assert int(opt.state[model.wte.weight]["step"]) == 15
    assert cap.measured_steps == [3, 6, 9, 12, 15]
    assert len(cap.reads) < 15


def test_csv_is_streamed_to_part_file_and_moved_into_place(tmp_path):
    out = tmp_path / "runs" / "snr.csv"
    part = tmp_path / "runs" / "snr.csv.part"
    model, opt = make()
    with lowmem.capture(opt, model, every=3, out=out) as cap:
        train(model, opt, 4)
        assert part.exists() and not out.exists()
        assert part.read_text().splitlines()[0] == HEADER_LINE
        same_samples(read_trajectory(part), cap.samples)       # flushed after the measurement at 3
        assert {s.step for s in read_trajectory(part)} == {3}
        train(model, opt, 3, start=4)
        assert {s.step for s in read_trajectory(part)} == {3, 6}
    assert out.exists() and not part.exists()
    assert out.read_text().splitlines()[0] == HEADER_LINE
    assert cap.path == out
    same_samples(read_trajectory(out), cap.samples)
    assert len(cap.samples) == len(out.read_text().splitlines()) - 1


def test_exception_inside_with_still_moves_file_into_place(tmp_path):
    out = tmp_path / "snr.csv"
    model, opt = make()
    with pytest.raises(KeyboardInterrupt):
        with lowmem.capture(opt, model, every=3, out=out) as cap:
            train(model, opt, 7)
            raise KeyboardInterrupt
    assert out.exists() and not (tmp_path / "snr.csv.part").exists()
    assert cap.measured_steps == [3, 6]
    same_samples(read_trajectory(out), cap.samples)
    # Closing again (and more steps after the hook is gone) changes nothing.
    cap.close()
    train(model, opt, 3, start=7)
    assert cap.measured_steps == [3, 6]


def _ema_of_grad_sq(model, opt, beta2):
    """Our own post-hook: v <- beta2 v + (1 - beta2) g^2 in float64, and a copy at each call."""
    v = {n: np.zeros(p.shape) for n, p in model.named_parameters()}
    history = []

    def hook(optimizer, args, kwargs):
        for n, p in model.named_parameters():
            if p.grad is not None:
                g = p.grad.double().numpy()
                v[n] = beta2 * v[n] + (1 - beta2) * g * g
        history.append({n: x.copy() for n, x in v.items()})

    opt.register_step_post_hook(hook)
    return v, history


@pytest.mark.parametrize("opt_cls,kwargs,beta2_arg,beta2", [
    (torch.optim.SGD, dict(momentum=0.9), None, 0.999),
    (torch.optim.AdamW, dict(betas=(0.9, 0.95)), None, 0.95),
    (torch.optim.SGD, dict(), 0.5, 0.5),
], ids=["sgd_default", "adam_betas", "explicit"])
def test_shadow_v_is_the_ema_of_squared_gradients(opt_cls, kwargs, beta2_arg, beta2, reference_snr):
    model, opt = make(opt_cls, **kwargs)
    v, history = _ema_of_grad_sq(model, opt, beta2)
    with lowmem.capture(opt, model, every=2, shadow=True, beta2=beta2_arg) as cap:
        train(model, opt, 5)
    assert cap.beta2 == beta2
    assert cap.measured_steps == [2, 4]
    for name, p in model.named_parameters():
        np.testing.assert_allclose(cap._shadow_v[p].double().numpy(), v[name], rtol=1e-5, atol=1e-12,
                                   err_msg=name)
    assert_samples_match([s for s in cap.samples if s.step == 4], history[3], reference_snr)


@pytest.mark.parametrize("opt_cls,kwargs", [
    (torch.optim.SGD, dict()),
    (torch.optim.SGD, dict(momentum=0.9)),
    (torch.optim.Adagrad, dict()),          # keeps a `step`, but no exp_avg_sq
], ids=["sgd", "sgd_momentum", "adagrad"])
def test_optimizer_without_exp_avg_sq_raises_at_first_step(opt_cls, kwargs):
    model, opt = make(opt_cls, **kwargs)
    with lowmem.capture(opt, model, every=3):
        backward(model, 0)
        with pytest.raises(NoAdamStateError, match=r"(?s)exp_avg_sq.*shadow"):
            opt.step()


def test_every_must_be_a_positive_integer():
    model, opt = make()
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match=repr(bad)):
            SnrCapture(opt, model, every=bad)


# TinyLM: wte, attn q/k/v/c_proj, ln_f weight and bias, lm_head.
N_TINY = 1 + 4 + 2 + 1


def test_another_models_optimizer_is_refused_at_construction():
    _, opt_a = make()
    model_b, _ = make()
    assert len(list(model_b.parameters())) == N_TINY
    with pytest.raises(ValueError, match=rf"none of the optimizer's {N_TINY} parameters belong to the model "
                                         rf"\(TinyLM, {N_TINY} parameters\): capture would measure nothing"):
        lowmem.capture(opt_a, model_b)
    assert not opt_a._optimizer_step_post_hooks                 # nothing was attached


def test_an_optimizer_with_some_foreign_parameters_warns_and_measures_the_models():
    model_a, _ = make()
    model_b, _ = make()
    opt = torch.optim.AdamW([model_a.attn.q.weight, *model_b.parameters()], lr=1e-2)
    with pytest.warns(UserWarning, match=rf"lowmem: 1 of the optimizer's {N_TINY + 1} parameters are not the "
                                         rf"model's \(TinyLM\); capture measures the other {N_TINY}"):
        cap = lowmem.capture(opt, model_b, every=1)
    with cap:
        train(model_b, opt, 1)
    assert {s.name for s in cap.samples} == {n for n, _ in model_b.named_parameters()}


HAND_CSV = """\
step,name,shape,view,subset,snr,mean_sq,var
10,w,4x4,raw:4x4,0,0.5,1.0,2.0
10,w,4x4,raw:4x4,1,0.25,1.0,4.0
20,w,4x4,raw:4x4,0,1.5,1.0,2.0
20,w,4x4,raw:4x4,1,nan,nan,nan
30,w,4x4,raw:4x4,0,2.5,1.0,2.0
30,w,4x4,raw:4x4,1,0.75,1.0,4.0
30,b,4,raw:4,0,3.0,1.0,1.0
"""


def test_time_mean_over_windows_by_hand(tmp_path):
    path = tmp_path / "hand.csv"
    path.write_text(HAND_CSV)
    traj = SnrTrajectory.read(path)
    assert traj.steps == [10, 20, 30]
    w0, w1, b0 = ("w", ViewLabel("raw", (4, 4)), (0,)), ("w", ViewLabel("raw", (4, 4)), (1,)), ("b", ViewLabel("raw", (4,)), (0,))

    def means(window):
        return {k: (m.snr, m.samples) for k, m in traj.time_mean(window).items()}

    assert means(None) == {w0: ((0.5 + 1.5 + 2.5) / 3, 3), w1: ((0.25 + 0.75) / 2, 2), b0: (3.0, 1)}
    assert means((20, 30)) == {w0: ((1.5 + 2.5) / 2, 2), w1: (0.75, 1), b0: (3.0, 1)}
    assert means((None, 20)) == {w0: ((0.5 + 1.5) / 2, 2), w1: (0.25, 1)}
    assert means((15, 25)) == {w0: (1.5, 1)}              # the NaN sample is skipped, not counted
    assert traj.final()[w0] == 2.5 and math.isnan(read_trajectory(path)[3].snr)


@pytest.mark.parametrize("bad_line,line_no", [
    ("20,w,4x4,raw:4x4,0,1.5,1.0", 3),                     # a field missing
    ("20,w,4x4,raw:4x4,0,high,1.0,2.0", 3),                # not a number
    ("twenty,w,4x4,raw:4x4,0,1.5,1.0,2.0", 3),
])
def test_corrupt_row_raises_naming_the_line(tmp_path, bad_line, line_no):
    lines = HAND_CSV.splitlines()
    lines[line_no - 1] = bad_line
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrajectoryError, match=f"bad.csv: line {line_no}:"):
        read_trajectory(path)


def test_wrong_header_raises_naming_line_one(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(HAND_CSV.replace("mean_sq", "mean2"))
    with pytest.raises(TrajectoryError, match="line 1:"):
        read_trajectory(path)


def test_torn_last_line_of_a_killed_writer_is_dropped(tmp_path):
    raw = ViewLabel("raw", (4, 4))
    rows = [Sample(3, "w", (4, 4), raw, (0,), 0.123456789, 1.5, 2.25),
            Sample(3, "w", (4, 4), raw, (1,), 0.5, 1.5, 4.5),
            Sample(6, "w", (4, 4), raw, (0, 1), 0.987654321, 12.5, 0.125)]
    writer = TrajectoryWriter(tmp_path / "snr.csv")
    writer.write(rows[:2])
    writer.write(rows[2:])
    whole = writer.partial.read_bytes()                   # the writer is "killed": never closed
    last_start = whole.rstrip(b"\r\n").rfind(b"\n") + 1
    last_end = len(whole.rstrip(b"\r\n"))
    torn = tmp_path / "torn.csv"
    for cut in range(last_start + 1, last_end + 1):       # every tear inside the last row's text
        torn.write_bytes(whole[:cut])
        same_samples(read_trajectory(torn), rows[:2])
    torn.write_bytes(whole)
    same_samples(read_trajectory(torn), rows)
    # A torn first row after the header is dropped the same way.
    first_end = whole.index(b"\n") + 1
    torn.write_bytes(whole[:first_end + 5])
    assert read_trajectory(torn) == []


@pytest.mark.parametrize("path", ["kernel", "torch ops"])
def test_a_measurements_temporaries_are_chunks_not_copies_of_the_state(path, monkeypatch):
    # A 4096 x 1024 weight: each of its m and v is 16 MiB. Measuring SNR and precision allocates
    # nothing bigger than the SNR's chunk (2^20 fp32 entries, 4 MiB), read from torch's profiler,
    # through the torch ops as through the native kernels (whose own scratch, allocated in C,
    # test_native_snr counts by hand)
    from torch.profiler import ProfilerActivity, profile

    from lowmem.compress.optim import native
    from lowmem.snr import estimator

    if path == "torch ops":
        monkeypatch.setattr(native, "snr_reads", lambda x: False)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.Linear(4096, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(4, 1024)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    cap = lowmem.capture(opt, model, every=10**9, precision=True)
    cap.detach()
    cap.measure(0)                                   # first call: code maps, lazy imports
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cap.measure(0)
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocations and max(allocations) <= 4 * estimator.CHUNK == 4 * 2**20
    assert 4 * 4096 * 1024 == 16 * 2**20                # one state tensor: four times that
    assert len(cap.precision_samples) > 0


def test_same_shaped_empty_parameters_are_measured_beside_the_others(reference_snr):
    # two (0, 8) parameters stack like any same-shaped pair: no slice, no finite SNR, no crash;
    # the other parameters' numbers as numpy's
    class WithEmpty(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.e0, self.e1 = nn.Parameter(torch.zeros(0, 8)), nn.Parameter(torch.zeros(0, 8))

        def forward(self, x):
            return self.fc(x).pow(2).sum() + self.e0.sum() + self.e1.sum()

    torch.manual_seed(0)
    model = WithEmpty()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with lowmem.capture(opt, model, every=1) as cap:
        model(torch.randn(4, 8)).backward()
        opt.step()
    by_name = {}
    for s in cap.samples:
        by_name.setdefault(s.name, []).append(s)
    assert {s.subset for s in by_name["e0"]} == {s.subset for s in by_name["e1"]} == {(0,), (1,), (0, 1)}
    assert all(math.isnan(s.snr) for s in by_name["e0"] + by_name["e1"])
    v = opt.state[model.fc.weight]["exp_avg_sq"].double().numpy()
    for s in by_name["fc.weight"]:
        assert s.snr == pytest.approx(reference_snr(v, s.subset)[0], rel=1e-4)
