"""Precision measurement during capture: the error each storage format of m and v causes, its
file, and its reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lowmem
from lowmem.compress.optim import native
from lowmem.compress.optim.state import roundtrip
from lowmem.snr import precision
from lowmem.snr.precision import (HEADER, PrecisionSample, PrecisionTrajectory, PrecisionWriter, candidates,
                                  read_precision)
from lowmem.snr.trajectory import TrajectoryError

B, SEEN = 6, 30   # batch; embedding rows that ever occur (the other 10 keep zero m and v)
GROUPS = ({"betas": (0.9, 0.95), "eps": 1e-8}, {"betas": (0.8, 0.99), "eps": 1e-3})


class Net(nn.Module):
    """A (16, 300) weight whose rows hold 2 int8 blocks and 3 int4 blocks, the last ones short; a
    (40, 300) embedding with rows that never see a gradient; a norm and a bias, not quantizable."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 300)
        self.fc = nn.Linear(300, 16)
        self.ln = nn.LayerNorm(16)

    def forward(self, x, idx):
        return self.ln(self.fc(x + self.emb(idx)))                 # (B, 16)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(B, 300, generator=g), torch.randint(SEEN, (B,), generator=g)


def make():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW([{"params": [model.emb.weight, model.fc.weight, model.fc.bias], **GROUPS[0]},
                             {"params": list(model.ln.parameters()), **GROUPS[1]}], lr=1e-2)
    return model, opt


def train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x, idx = batch(i)
        (model(x, idx) - 0.5).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def reference_errors(m: torch.Tensor, v: torch.Tensor, step: int, betas, eps) -> dict:
    """{(state, format): (state error, update error)} in numpy float64, from the formula: only Q
    (the state stored in the format and read back) comes from lowmem."""
    m64, v64 = m.double().numpy(), v.double().numpy()
    bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step

    def update(mm, vv):
        return (mm / bc1) / (np.sqrt(vv) / math.sqrt(bc2) + eps)

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    u = update(m64, v64)
    out = {}
    for fmt in candidates("m", m.shape):
        q = roundtrip("m", fmt, m).double().numpy()
        out[("m", fmt)] = (rel(q, m64), rel(update(q, v64), u))
    for fmt in candidates("v", v.shape):
        q = roundtrip("v", fmt, v).double().numpy()
        out[("v", fmt)] = (rel(q, v64), rel(update(m64, q), u))
    return out


def test_recorded_errors_equal_a_numpy_float64_computation(tmp_path):
    model, opt = make()
    with lowmem.capture(opt, model, every=3, precision_out=tmp_path / "precision.csv") as cap:
        train(model, opt, 3)
    names = {p: n for n, p in model.named_parameters()}
    got = {(s.name, s.state, s.format): (s.state_error, s.update_error) for s in cap.precision_samples}
    want = {}
    for group, settings in zip(opt.param_groups, GROUPS):
        for p in group["params"]:
            st = opt.state[p]
            assert int(st["step"]) == 3
            for (which, fmt), errors in reference_errors(st["exp_avg"], st["exp_avg_sq"], 3, settings["betas"],
                                                         settings["eps"]).items():
                want[(names[p], which, fmt)] = errors
    assert set(got) == set(want)
    for key, errors in want.items():
        np.testing.assert_allclose(got[key], errors, rtol=1e-4, err_msg=str(key))
    # the formats tell apart: bf16 < int8 < int4 in the update error of the quantizable weight
    fc = {fmt: got[("fc.weight", "m", fmt)][1] for fmt in ("bf16", "int8", "int4")}
    assert fc["bf16"] < fc["int8"] < fc["int4"]
    assert {s.step for s in cap.precision_samples} == {3}


def test_precision_every_measures_at_the_first_measurement_and_its_multiples_only_with_those_steps_numbers(tmp_path):
    model, opt = make()
    out = tmp_path / "precision.csv"
    with lowmem.capture(opt, model, every=2, precision_out=out, precision_every=6) as cap:
        train(model, opt, 6)
        states = {n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
                  for n, p in model.named_parameters()}
        train(model, opt, 7, start=6)
        assert cap.measure(13) and cap.measured_steps[-1] == 13   # an explicit measure off the cadence
    assert cap.measured_steps == [2, 4, 6, 8, 10, 12, 13]
    assert {s.step for s in cap.precision_samples} == {2, 6, 12}   # the first measurement, then 6's multiples
    assert read_precision(out) == cap.precision_samples
    settings = {n: GROUPS[0] if not n.startswith("ln.") else GROUPS[1] for n in states}
    got = {(s.name, s.state, s.format): (s.state_error, s.update_error) for s in cap.precision_samples if s.step == 6}
    for name, (m, v) in states.items():
        for (which, fmt), errors in reference_errors(m, v, 6, settings[name]["betas"], settings[name]["eps"]).items():
            np.testing.assert_allclose(got[(name, which, fmt)], errors, rtol=1e-4, err_msg=str((name, which, fmt)))


@pytest.mark.parametrize("bad", [0, 3, 5, -4, 4.0, "4", True])
def test_precision_every_must_be_a_positive_multiple_of_every(bad):
    model, opt = make()
    with pytest.raises(ValueError, match="precision_every must be a positive multiple of every"):
        lowmem.capture(opt, model, every=1 if bad is True else 2, precision=True, precision_every=bad)


def test_precision_every_of_a_capture_that_measures_no_precision_is_refused_and_numpy_integers_are_taken():
    model, opt = make()
    for kwargs in ({}, {"precision": False}, {"shadow": True, "precision": True}):
        with pytest.raises(ValueError, match="this capture measures none"):
            lowmem.capture(opt, model, every=2, precision_every=4, **kwargs)
    cap = lowmem.capture(opt, model, every=2, precision=True, precision_every=np.int64(6))
    with cap:
        train(model, opt, 6)
    assert cap.measured_steps == [2, 4, 6] and {s.step for s in cap.precision_samples} == {2, 6}


@pytest.mark.parametrize("chunk", [1000, 300, 1])
def test_row_chunks_give_the_whole_tensors_errors(monkeypatch, chunk):
    # error_sums works through whole rows a chunk at a time (at least one row): 3 rows, 1 row, and
    # a chunk smaller than a row; the errors are those of the whole tensor's round trip, by numpy.
    from lowmem.snr import precision

    model, opt = make()
    train(model, opt, 4)
    monkeypatch.setattr(precision, "CHUNK", chunk)
    for p in (model.emb.weight, model.fc.weight, model.ln.weight):
        st = opt.state[p]
        got = precision.errors_from_sums(precision.error_sums(st["exp_avg"], st["exp_avg_sq"], st["step"],
                                                              GROUPS[p is model.ln.weight]["betas"],
                                                              GROUPS[p is model.ln.weight]["eps"], p.shape), p.shape)
        want = reference_errors(st["exp_avg"], st["exp_avg_sq"], 4, GROUPS[p is model.ln.weight]["betas"],
                                GROUPS[p is model.ln.weight]["eps"])
        assert {(w, f) for w, f, *_ in got} == set(want)
        for which, fmt, state_error, update_error in got:
            np.testing.assert_allclose([state_error, update_error], want[(which, fmt)], rtol=1e-4)


def reference_sums(m, v, step, betas, eps, shape) -> np.ndarray:
    """`error_sums`' numbers in numpy float64 (only the round trips Q come from lowmem)."""
    m64, v64 = m.double().numpy(), v.double().numpy()
    bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step
    update = lambda mm, vv: (mm / bc1) / (np.sqrt(vv) / math.sqrt(bc2) + eps)
    u = update(m64, v64)
    out = [(m64 ** 2).sum(), (v64 ** 2).sum(), (u ** 2).sum()]
    for fmt in candidates("m", shape):
        q = roundtrip("m", fmt, m).double().numpy()
        out += [((q - m64) ** 2).sum(), ((update(q, v64) - u) ** 2).sum()]
    for fmt in candidates("v", shape):
        q = roundtrip("v", fmt, v).double().numpy()
        out += [((q - v64) ** 2).sum(), ((update(m64, q) - u) ** 2).sum()]
    return np.array(out)


def native_states():
    """Shapes the native kernel cuts differently: rows longer than its work items (2 x 300,000),
    rows ending in short blocks (257), 4-D, 1-D and too small to quantize, an all-zero state, and
    rows of zeros among the others; m of varied scale per row, v heavy-tailed."""
    g = torch.Generator().manual_seed(0)
    states = []
    for shape in [(2, 300_000), (50, 257), (7, 3, 5, 33), (300,), (8, 64), (64, 80)]:
        m = torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g)
        v = torch.rand(shape, generator=g) ** 4 * 1e-4
        if len(shape) > 1:
            m[1], v[1] = 0, 0
        states.append((m, v, torch.tensor(7.0), (0.9, 0.95), 1e-8, shape))
    states.append((torch.zeros(64, 80), torch.zeros(64, 80), 3, (0.8, 0.99), 1e-3, (64, 80)))
    return states


@pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernel cannot be built")
def test_native_kernel_sums_equal_numpy_float64():
    states = native_states()
    got = precision.error_sums_all(states)
    for state, sums in zip(states, got):
        want = reference_sums(state[0], state[1], 7 if state[2] != 3 else 3, *state[3:])
        assert sums.dtype == torch.float64 and sums.shape == want.shape
        np.testing.assert_allclose(sums.numpy(), want, rtol=1e-5, atol=0, err_msg=str(state[5]))
    assert torch.equal(got[-1], torch.zeros(13, dtype=torch.float64))   # zero state: zero norms and errors
    # the torch path (GPU, bf16 state, no compiler) gives the same numbers
    for state, sums in zip(states, got):
        np.testing.assert_allclose(precision.error_sums(*state).numpy(), sums.numpy(), rtol=1e-5, atol=0)


@pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernel cannot be built")
def test_native_sums_do_not_depend_on_the_number_of_threads():
    states = native_states()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = precision.error_sums_all(states)
        torch.set_num_threads(3)
        three = precision.error_sums_all(states)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


def test_states_the_kernel_cannot_read_go_through_torch():
    # bf16 state and a non-contiguous one: the torch path, the numbers of their fp32 copies
    g = torch.Generator().manual_seed(1)
    m, v = torch.randn(64, 80, generator=g), torch.rand(64, 80, generator=g)
    states = [(m.bfloat16(), v.bfloat16(), 5, (0.9, 0.999), 1e-8, (64, 80)),
              (m.t().contiguous().t(), v, 5, (0.9, 0.999), 1e-8, (64, 80))]
    got = precision.error_sums_all(states)
    np.testing.assert_allclose(got[0].numpy(), reference_sums(m.bfloat16().float(), v.bfloat16().float(), 5,
                                                              (0.9, 0.999), 1e-8, (64, 80)), rtol=1e-5)
    np.testing.assert_allclose(got[1].numpy(), reference_sums(m, v, 5, (0.9, 0.999), 1e-8, (64, 80)), rtol=1e-5)


def test_parameters_too_small_to_quantize_measure_only_bf16():
    model, opt = make()
    with lowmem.capture(opt, model, every=1, precision=True) as cap:
        train(model, opt, 1)
    formats = {}
    for s in cap.precision_samples:
        formats.setdefault(s.name, set()).add((s.state, s.format))
    quantized = {("m", "bf16"), ("m", "int8"), ("m", "int4"), ("v", "bf16"), ("v", "int8")}
    assert formats == {"emb.weight": quantized, "fc.weight": quantized, "fc.bias": {("m", "bf16"), ("v", "bf16")},
                       "ln.weight": {("m", "bf16"), ("v", "bf16")}, "ln.bias": {("m", "bf16"), ("v", "bf16")}}


def test_shadow_mode_measures_no_precision_and_writes_no_file(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    with lowmem.capture(opt, model, every=1, shadow=True, precision_out=tmp_path / "precision.csv") as cap:
        train(model, opt, 2)
    assert cap.measured_steps == [1, 2]
    assert cap.precision_samples == [] and not cap.precision
    assert not (tmp_path / "precision.csv").exists() and not (tmp_path / "precision.csv.part").exists()


def test_without_precision_nothing_is_measured():
    model, opt = make()
    with lowmem.capture(opt, model, every=1) as cap:
        train(model, opt, 2)
    assert cap.measured_steps == [1, 2] and cap.precision_samples == []


def test_precision_file_is_streamed_to_part_and_moved_into_place(tmp_path):
    out, part = tmp_path / "precision.csv", tmp_path / "precision.csv.part"
    model, opt = make()
    with lowmem.capture(opt, model, every=2, out=tmp_path / "snr.csv", precision_out=out) as cap:
        train(model, opt, 2)
        assert part.exists() and not out.exists()
        assert read_precision(part) == cap.precision_samples      # flushed after the measurement at 2
        train(model, opt, 2, start=2)
    assert out.exists() and not part.exists() and cap.precision_path == out
    assert out.read_text().splitlines()[0] == ",".join(HEADER)
    samples = read_precision(out)
    assert samples == cap.precision_samples and {s.step for s in samples} == {2, 4}
    assert len(samples) == len(out.read_text().splitlines()) - 1


def test_torn_last_line_is_dropped_and_a_bad_row_is_named(tmp_path):
    path = tmp_path / "precision.csv.part"
    rows = [PrecisionSample(5, "a.weight", (64, 64), "m", "int8", 0.01, 0.02),
            PrecisionSample(5, "a.weight", (64, 64), "v", "bf16", 0.001, math.inf)]
    writer = PrecisionWriter(tmp_path / "precision.csv")
    writer.write(rows)
    text = writer.partial.read_text()
    writer._file.close()
    path.write_text(text + "10,a.weight,64x64,m,in")
    back = read_precision(path)
    assert back[0] == rows[0] and math.isnan(back[1].update_error)   # non-finite values are written as nan
    path.write_text(text + "10,a.weight,64x64,m,int3,0.1,0.2\n")
    with pytest.raises(TrajectoryError, match=r"precision.csv.part: line 4: 'int3' is not a measured format of m"):
        read_precision(path)


def test_worst_error_is_the_largest_over_the_window_by_hand():
    s = lambda step, err: PrecisionSample(step, "w", (64, 64), "m", "int8", err / 2, err)   # noqa: E731
    traj = PrecisionTrajectory([s(10, 0.02), s(20, 0.07), s(30, 0.03), s(40, float("nan"))])
    assert traj.worst()[("w", "m", "int8")].update_error == math.inf          # nan counts as failing
    w = traj.worst((10, 30))[("w", "m", "int8")]
    assert (w.update_error, w.state_error, w.samples) == (0.07, 0.035, 3)
    assert traj.worst((25, 35))[("w", "m", "int8")].update_error == 0.03
    assert traj.by_layer((25, 35)) == {"w": {("m", "int8"): traj.worst((25, 35))[("w", "m", "int8")]}}


def test_same_shaped_states_off_the_kernel_are_stacked_and_give_each_ones_numbers(monkeypatch):
    # Off the native kernel (here: as without a compiler; on a GPU always) same-shaped states are
    # stacked and measured in one set of ops: each tensor's sums equal its own measurement and
    # numpy float64; a state of another step, and a large one, are measured alone.
    monkeypatch.setattr(native, "available", lambda: False)
    g = torch.Generator().manual_seed(4)
    states = []
    for i in range(5):
        m = torch.randn(24, 300, generator=g) * (i + 1)
        v = torch.rand(24, 300, generator=g) ** 3
        if i == 2:
            m[3], v[3] = 0, 0
        states.append((m, v, 6 if i != 4 else torch.tensor(9.0), (0.9, 0.95), 1e-8, (24, 300)))
    states.append((torch.randn(4, 50), torch.rand(4, 50), 6, (0.9, 0.95), 1e-8, (4, 50)))   # bf16 formats only
    got = precision.error_sums_all(states)
    for state, sums in zip(states, got):
        step = int(state[2])
        np.testing.assert_allclose(sums.numpy(), precision.error_sums(*state).numpy(), rtol=1e-5)
        np.testing.assert_allclose(sums.numpy(), reference_sums(state[0], state[1], step, *state[3:]), rtol=1e-5)


@pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernel cannot be built")
def test_native_sums_of_a_tiny_state_do_not_underflow_and_empty_ones_are_zero():
    # v about 1e-22 (a weight that sees almost no gradient): its squares are below float32's
    # range, so they are taken in double; the errors equal numpy float64's. An empty state
    # has zero sums.
    g = torch.Generator().manual_seed(5)
    m = torch.randn(16, 300, generator=g) * 1e-11
    v = torch.rand(16, 300, generator=g) * 1e-22
    state = (m, v, 5, (0.9, 0.95), 1e-8, (16, 300))
    got = precision.error_sums_all([state])[0]
    want = reference_sums(m, v, 5, (0.9, 0.95), 1e-8, (16, 300))
    assert (want > 0).all()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    out = torch.ones(13, dtype=torch.float64)
    native.precision_sums([(torch.zeros(3, 0), torch.zeros(3, 0), out, 0.5, 0.5, 1e-8, True)])
    assert torch.equal(out, torch.zeros(13, dtype=torch.float64))
