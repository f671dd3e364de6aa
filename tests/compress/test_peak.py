"""Peak training memory traced on fake tensors (`lowmem.compress.peak`), against real steps'
measured peak, hand arithmetic on the 7B and 70B configs, and brute-force searches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowmem
from lowmem.compress.configs import LlamaConfig, build_config_model
from lowmem.compress.peak import (PeakMemory, PeakTraceError, combine, largest_batch, lm_loss, measure_peak,
                                  parse_size, peak_report, resized_batch, trace_forward_backward,
                                  trace_optimizer_step, trace_peak)
from lowmem.examples import shakespeare

HERE = Path(__file__).resolve().parent
ROUND = 512   # bytes: a small tensor's tolerance (the trace counts CPU tensors' bytes unrounded)


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)


def _eve(model):
    return lowmem.Eve(model, lr=1e-3, backend="foreach")


def _adam_mini(model):
    return lowmem.AdamMini(model, lr=1e-3, backend="foreach")


def _tiny_llama():
    return LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000).build("cpu")


def _tiny_gpt2():
    from lowmem.compress.configs import GPT2Config

    return GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=8000, n_positions=128).build("cpu")   # tied head


def _mlp():
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 10))


def _mlp_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


# name -> (build_model, example batch, loss_fn, make_optimizer): three models, three optimizers
CASES = {
    "shakespeare-adamw": (shakespeare.build_model, lambda b: resized_batch(shakespeare.get_batch(0), b),
                          shakespeare.loss_fn, _adamw),
    "llama-eve": (_tiny_llama, lambda b: torch.zeros(b, 256, dtype=torch.long), lm_loss, _eve),
    "gpt2-adamw": (_tiny_gpt2, lambda b: torch.zeros(b, 128, dtype=torch.long), lm_loss,
                   _adamw),
    "mlp-adam-mini": (_mlp, lambda b: (torch.zeros(b, 512), torch.zeros(b, dtype=torch.long)), _mlp_loss, _adam_mini),
}


def _measure_here(case: str, batch: int) -> int:
    """In this process: a warm-up at batch 1 (kernels, thread pools, lazy imports), then the
    measured peak of two real steps at `batch`."""
    build, make_batch, loss_fn, make_opt = CASES[case]
    torch.set_num_threads(1)
    measure_peak(build, lambda: make_batch(1), loss_fn, make_opt)
    return measure_peak(build, lambda: make_batch(batch), loss_fn, make_opt)


def measured(case: str, batch: int) -> int:
    """The real peak of `case` at `batch`, measured in a fresh process whose glibc maps every
    allocation of 64 KiB or more on its own (so freed tensors leave the resident set)."""
    code = f"import json, test_peak; print(json.dumps(test_peak._measure_here({case!r}, {batch})))"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def traced(case: str, batch: int) -> PeakMemory:
    build, make_batch, loss_fn, make_opt = CASES[case]
    return trace_peak(build, lambda: make_batch(batch), loss_fn, make_opt)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set size from /proc")
@pytest.mark.parametrize("case, batch", [("shakespeare-adamw", 48), ("llama-eve", 16), ("gpt2-adamw", 16),
                                         ("mlp-adam-mini", 4096)])
def test_the_traced_peak_is_the_measured_peak_of_real_steps(case, batch):
    # The measured peak counts every page the step touched (kernels' workspaces, page rounding,
    # the allocator's own): within 2% of the trace, which counts tensors alone.
    estimate, real = traced(case, batch).peak, measured(case, batch)
    assert estimate > 50 * 2**20          # large enough for the tolerance to mean something
    assert abs(real - estimate) <= 0.02 * estimate, (case, real, estimate)


@pytest.mark.parametrize("make_opt", [_adamw, _eve, lambda m: lowmem.AdaMeM(m, lr=1e-3)], ids=["adamw", "eve", "adamem"])
@pytest.mark.parametrize("batch", [1, 16])
def test_its_two_parts_combine_to_the_trace_of_whole_steps(make_opt, batch):
    # At batch 1 the optimizer step holds the peak, at 16 the backward does; the whole steps'
    # trace keeps a scalar loss and its gradient (two tiny tensors) the parts do not.
    build, make_batch, loss_fn = shakespeare.build_model, lambda: resized_batch(shakespeare.get_batch(0), batch), \
        shakespeare.loss_fn
    whole = trace_peak(build, make_batch, loss_fn, make_opt)
    parts = combine(trace_forward_backward(build, make_batch, loss_fn), trace_optimizer_step(build, make_opt))
    assert 0 <= whole.peak - parts.peak <= 2 * ROUND
    assert (parts.weights, parts.state) == (whole.weights, whole.state)


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-70b"])
def test_weights_gradients_and_adamw_state_of_the_big_configs_by_hand(name):
    # bf16 parameters: 2 bytes an entry for the weights, their gradients and torch AdamW's m and v
    # (its states follow the parameters' dtype), plus a 4-byte fp32 step counter per tensor.
    shapes = [p.shape for p in build_config_model(name).parameters()]
    numel = [s.numel() for s in shapes]
    step = trace_optimizer_step(lambda: build_config_model(name), _adamw, param_dtype=torch.bfloat16)
    weights = sum(2 * n for n in numel)
    assert step.weights == weights and step.gradients == weights
    assert step.state == 2 * weights + 4 * len(numel)
    published = {"llama2-7b": 6_738_415_616, "llama2-70b": 68_976_648_192}[name]
    assert sum(numel) == published
    assert step.peak >= weights * 4     # weights, gradients, m and v at least


@pytest.mark.parametrize("fmt", ["m=int8", "m=int4,v=int8", "m=bf16"])
def test_quantized_state_in_the_trace_is_what_a_real_step_keeps(fmt):
    # Traced first, then stepped for real in the same process: the trace leaves the code maps and
    # their encoders real (a real step after it quantizes as before). The tracker counts a CPU
    # tensor's bytes as they are.
    from lowmem.compress.formats import StateFormat

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(300, 1000), nn.GELU(), nn.Linear(1000, 7))

    def make(model):
        return lowmem.Eve(model, lr=1e-3, backend="foreach", state_format=StateFormat.parse(fmt))

    step = trace_optimizer_step(build, make)
    model = build()
    opt = make(model)
    model(torch.randn(4, 300)).square().mean().backward()
    opt.step()
    tensors = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert any(t.dtype in (torch.uint8, torch.bfloat16) for t in tensors)
    assert step.state == sum(t.nbytes for t in tensors)


def _unique_state_bytes(opt) -> int:
    """Bytes of an optimizer's state tensors, each storage once (bitsandbytes shares its code maps
    between parameters); a tensor subclass's (torchao's) through its inner tensors."""
    seen, total = set(), 0

    def visit(t):
        nonlocal total
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for n in names:
                visit(getattr(t, n))
            return
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                visit(v)
    return total


@pytest.mark.parametrize("peer", ["torchao-adamw8bit", "torchao-adamw4bit", "bnb-adamw8bit"])
def test_the_8_and_4_bit_adamw_of_torchao_and_bitsandbytes_trace_to_the_state_a_real_step_keeps(peer):
    # torchao builds its code maps from tensor values and compiles its step: the maps are made
    # real before the trace, the step runs eagerly in it. bitsandbytes builds its maps when it is
    # made: made again with the fake mode unset. The traced state is the bytes of the real
    # optimizer's state after a real step, and the count by hand; torch.compile is itself after.
    from lowmem.compress.optim.registry import PEERS

    entry = PEERS[peer]
    if entry.unavailable():
        pytest.skip(entry.unavailable())

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 7))

    compile_ = torch.compile
    step = trace_optimizer_step(build, lambda model: entry.build(model, 1e-3))
    assert torch.compile is compile_
    model = build()
    opt = entry.build(model, 1e-3)
    model(torch.randn(4, 256)).square().mean().backward()
    opt.step()
    real = _unique_state_bytes(opt)
    assert step.state == real
    # By hand: a tensor of at least 4096 entries (the 512 x 256 weight) keeps m and v as codes of 1 or
    # 1/2 byte an entry and an fp32 scale per block of 256 or 128, the others fp32 m and v; code maps
    # of 256 or 16 fp32 values: torchao one per quantized tensor and state, bitsandbytes two in all.
    big, small = 512 * 256, 512 + 7 * 512 + 7
    code, block, levels = (0.5, 128, 16) if peer.endswith("4bit") else (1, 256, 256)
    maps = 2 * 4 * levels
    hand = 2 * (big * code + 4 * big // block) + maps + 2 * 4 * small
    assert real == hand + (16 if peer.startswith("torchao") else 0)   # torchao's four step counters


@pytest.mark.parametrize("arch", ["gpt-neox", "deepseek-v3"])
def test_interleaved_parts_trace_to_the_state_a_real_step_keeps(arch):
    # Each head's q/k/v rows (GPT-NeoX) or key/value rows (DeepSeek-V3's MLA) are strided parts,
    # not viewable in their view shape: updated through their own path, in the trace as for real
    # (a fake tensor refuses such a view with ValueError where a real one raises RuntimeError).
    pytest.importorskip("transformers")
    import test_architectures

    build = {"gpt-neox": test_architectures.neox, "deepseek-v3": test_architectures.deepseek_v3}[arch]

    def make(model):
        return lowmem.Eve(model, lr=1e-3, backend="foreach")

    step = trace_optimizer_step(build, make)
    model = build()
    opt = make(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert step.state == sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def test_transformers_moe_experts_trace_in_fp32():
    # transformers 5 runs an MoE layer's experts with torch._grouped_mm, whose meta kernel (what fake
    # tensors run) takes bf16 only while the CPU kernel takes fp32: traced all the same, its weights
    # and AdamW's state by hand; torch's own meta kernel is back after the trace.
    transformers = pytest.importorskip("transformers")

    def build():
        torch.manual_seed(0)
        return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, first_k_dense_replace=1,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4,
            qk_nope_head_dim=6, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            n_group=1, topk_group=1))

    def loss(model, ids):
        return model(ids).logits.float().square().mean()

    peak = trace_peak(build, lambda: torch.zeros(2, 16, dtype=torch.long), loss, _adamw)
    numel = [p.numel() for p in build().parameters()]
    assert peak.weights == 4 * sum(numel) and peak.state == 8 * sum(numel) + 4 * len(numel)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem.compress.peak import _cpu_meta_kernels

    def grouped(k: int):
        return torch._grouped_mm(torch.empty(8, 4), torch.empty(2, k, 3), offs=torch.tensor([4, 8], dtype=torch.int32))

    with FakeTensorMode(), _cpu_meta_kernels():
        assert grouped(4).shape == (8, 3)
        with pytest.raises(RuntimeError):     # torch's own shape checks still hold
            grouped(5)
    with FakeTensorMode():                    # torch's rule is back, cached answers included
        with pytest.raises(RuntimeError, match="BF16"):
            grouped(4)


def test_a_constructor_that_reads_values_is_refused_unless_a_peers():
    # bitsandbytes' constructor reads values (its code maps) and is made again outside the fake
    # mode; any other optimizer's is not (made for real it could allocate real state): refused
    class Odd(torch.optim.SGD):
        def __init__(self, params):
            params = list(params)
            self.scale = float(params[0].abs().max())     # a value: fake tensors have none
            super().__init__(params, lr=1e-3)

    with pytest.raises(PeakTraceError):
        trace_optimizer_step(_mlp, lambda model: Odd(model.parameters()))


def test_a_forward_that_compiles_traces_in_parts_as_whole():
    # torch.compile(fullgraph=True) inside a model's forward runs eagerly in the trace, in the whole
    # steps' trace and in the forward-and-backward part alike, so the two parts still combine to it
    class Compiled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 256)

        def forward(self, x):
            return torch.compile(nn.functional.gelu, fullgraph=True)(self.fc(x))

    def loss(model, x):
        return model(x).square().mean()

    batch = lambda: torch.zeros(64, 256)   # noqa: E731
    whole = trace_peak(Compiled, batch, loss, _adamw)
    parts = combine(trace_forward_backward(Compiled, batch, loss), trace_optimizer_step(Compiled, _adamw))
    assert 0 <= whole.peak - parts.peak <= 2 * ROUND


def test_a_tied_weight_is_one_tensor_in_the_trace():
    # GPT-2's LM head is its token embedding: 124,439,808 parameters once, not 50257 x 768 more
    step = trace_optimizer_step(lambda: build_config_model("gpt2-124m"), _adamw)
    assert step.weights == sum(4 * p.numel() for p in build_config_model("gpt2-124m").parameters())
    assert sum(p.numel() for p in build_config_model("gpt2-124m").parameters()) == 124_439_808


def test_a_bf16_forward_and_backward_of_llama2_7b_traces_without_memory():
    fb = trace_forward_backward(lambda: build_config_model("llama2-7b"), lambda: torch.zeros(1, 128, dtype=torch.long),
                                lm_loss, param_dtype=torch.bfloat16)
    assert fb.weights == sum(2 * p.numel() for p in build_config_model("llama2-7b").parameters())
    assert fb.peak > fb.weights


@pytest.mark.parametrize("shape", ["linear", "kink", "convex", "flat"])
def test_largest_batch_is_the_largest_that_fits_by_brute_force(shape):
    f = {"linear": lambda b: 1000 + 37 * b,
         "kink": lambda b: max(5000, 800 + 29 * b + (b // 50) * 400),    # not linear: interpolation is off
         "convex": lambda b: 900 + b * b // 3,
         "flat": lambda b: 4000}[shape]
    calls = []

    def peak_at(b):
        calls.append(b)
        return PeakMemory(0, 0, 0, 0, 0, 0, f(b), batch=b)

    for budget in (900, 1037, 1074, 4000, 5000, 7777, 20_000):
        calls.clear()
        want = max((b for b in range(1, 4000) if f(b) <= budget), default=0)
        if shape == "flat" and budget >= 4000:
            want = 1 << 20       # nothing grows: the search stops at its limit
        got, memory = largest_batch(peak_at, budget)
        assert got == want, (shape, budget)
        assert (memory is None) == (want == 0)
        assert len(set(calls)) <= 2 * 12 + 4, (shape, budget, len(set(calls)))   # twice halving's, about


def test_the_largest_batch_that_fits_is_what_real_steps_fit():
    # A budget halfway between the traced peaks of batches 40 and 41: 40 fits and 41 does not,
    # by the trace (through the shared forward-backward traces and the search) and by real steps.
    budget = (traced("shakespeare-adamw", 40).peak + traced("shakespeare-adamw", 41).peak) // 2
    report = peak_report(shakespeare.build_model, shakespeare.get_batch(0), shakespeare.loss_fn, {"adamw": _adamw},
                         budget=budget)
    assert report.rows[0].fits == 40
    if sys.platform.startswith("linux"):
        assert measured("shakespeare-adamw", 40) <= budget < measured("shakespeare-adamw", 41)


def test_activation_checkpointing_keeps_only_the_blocks_inputs():
    build, loss_fn = shakespeare.build_model, shakespeare.loss_fn
    batch = lambda: resized_batch(shakespeare.get_batch(0), 32)  # noqa: E731
    plain = trace_forward_backward(build, batch, loss_fn)
    checkpointed = trace_forward_backward(build, batch, loss_fn, checkpointing=True)
    # what a block saves per layer is far more than its input: 4 layers, so well under half
    assert checkpointed.peak < 0.5 * plain.peak
    with pytest.raises(PeakTraceError, match="longest nn.ModuleList"):
        trace_forward_backward(_mlp, lambda: (torch.zeros(2, 512), torch.zeros(2, dtype=torch.long)), _mlp_loss,
                               checkpointing=True)


def test_a_step_that_reads_values_is_refused_with_the_line_that_does():
    def loss_fn(model, batch):
        loss = _mlp_loss(model, batch)
        if loss.item() > 0:            # a host sync: no value on a fake tensor
            return loss
        return loss

    with pytest.raises(PeakTraceError, match=r"test_peak.py:\d+ \(if loss.item\(\) > 0"):
        trace_forward_backward(_mlp, lambda: (torch.zeros(2, 512), torch.zeros(2, dtype=torch.long)), loss_fn)


def test_sizes_are_read_as_people_write_them():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("80GB") == 80 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20 and parse_size("1000") == 1000
    for bad in ("abc", "0", "-1GiB", "5XB", ""):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def test_the_small_configs_of_each_family_trace_too():
    for name in ("gpt2-124m", "tinyllama-1.1b"):      # the larger ones run the same code
        fb = trace_forward_backward(lambda: build_config_model(name), lambda: torch.zeros(1, 16, dtype=torch.long),
                                    lm_loss)
        assert fb.gradients > 0, name


def test_fsdp2_per_rank_state_is_each_ranks_shards_by_hand():
    # FSDP2 shards dim 0 into `world` pieces (the last ones padded to the same size); each rank
    # keeps AdamW's m and v of its own shard and a 4-byte step counter per parameter.
    import math

    import torch.distributed as dist

    world = 4
    build = _tiny_gpt2
    shapes = [p.shape for p in build().parameters()]
    make_batch = lambda: torch.zeros(2, 128, dtype=torch.long)  # noqa: E731
    one = trace_peak(build, make_batch, lm_loss, _adamw)
    sharded = trace_peak(build, make_batch, lm_loss, _adamw, world=world)
    shard = [math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes]
    # within 512 bytes per state tensor of the hand count: how FSDP2 lays out the shards of small
    # 1-D tensors (padding, views) is its own
    assert abs(sharded.state - (sum(2 * 4 * n for n in shard) + 4 * len(shapes))) <= 2 * 512 * len(shapes)
    assert sharded.state < 0.26 * one.state
    assert sharded.peak < one.peak
    assert not dist.is_initialized()                  # the fake process group is gone


def test_what_the_users_code_caches_while_building_stays_real():
    # the built-in example loads its text on first use (an lru_cache) inside build_model(): the
    # trace must leave it a real CPU tensor, or every later real run would find it on meta
    shakespeare._corpus.cache_clear()
    trace_forward_backward(shakespeare.build_model, lambda: resized_batch(shakespeare.get_batch(0), 2),
                           shakespeare.loss_fn)
    x, _ = shakespeare.get_batch(0)
    assert x.device.type == "cpu" and not x.is_meta
    shakespeare.loss_fn(shakespeare.build_model(), (x, x)).backward()
