"""Peak training memory: the estimate traced on fake tensors against the measured peak of real steps.

    python benchmarks/peak_memory.py [--device cpu|cuda] [--cases all|NAME,...] [--json]

For each case (a model, an optimizer, a batch) it prints `lowmem.compress.peak.trace_peak`'s
estimate, the peak of two real training steps (`measure_peak`) and their ratio, then the time
one trace of the 7B and 70B Llama configs takes on this machine.

Measured peak: on CPU the process's peak resident set size above its size before the model was
built, in a fresh process per case, after a warm-up at batch 1, with one torch thread and
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc maps each tensor of 64 KiB or more on its own, so freed
tensors leave the resident set); it counts every page the step touched (kernels' workspaces,
page rounding), not only tensors. On CUDA ``torch.cuda.max_memory_allocated`` (tensor bytes,
the allocator's rounding included) and, beside it, ``max_memory_reserved`` (what the caching
allocator held: the number that decides an out-of-memory error). Every optimizer runs its
``foreach`` path in both, as the estimate assumes (torch AdamW ``foreach=True``; lowmem's
``backend="foreach"``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch import nn

import lowmem
from lowmem.compress.configs import LlamaConfig, build_config_model
from lowmem.compress.peak import lm_loss, measure_peak, resized_batch, trace_forward_backward, trace_peak
from lowmem.examples import shakespeare


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)


def _eve(model):
    return lowmem.Eve(model, lr=1e-3, backend="foreach")


def _adam_mini(model):
    return lowmem.AdamMini(model, lr=1e-3, backend="foreach")


def _tiny_llama():
    return LlamaConfig(num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=8000).build("cpu")


def _tiny_llama_mha():
    return LlamaConfig(num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=8000).build("cpu")


def _mlp():
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 10))


def _mlp_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _tokens(b: int, t: int):
    return lambda device="cpu": torch.zeros(b, t, dtype=torch.long, device=device)


# name -> (description, build_model, make_batch(device), loss_fn, make_optimizer)
CASES = {
    "shakespeare-adamw": ("built-in GPT (0.8M), batch 64 x 128, AdamW", shakespeare.build_model,
                          lambda device="cpu": resized_batch(shakespeare.get_batch(0), 64, device=device),
                          shakespeare.loss_fn, _adamw),
    "shakespeare-eve": ("built-in GPT (0.8M), batch 64 x 128, Eve", shakespeare.build_model,
                        lambda device="cpu": resized_batch(shakespeare.get_batch(0), 64, device=device),
                        shakespeare.loss_fn, _eve),
    "llama-adamw": ("Llama 4 x 512, GQA (17M), batch 8 x 512, AdamW", _tiny_llama, _tokens(8, 512), lm_loss, _adamw),
    "llama-eve": ("Llama 4 x 512, GQA (17M), batch 8 x 512, Eve", _tiny_llama, _tokens(8, 512), lm_loss, _eve),
    "llama-mha-adamw": ("Llama 4 x 512, no GQA (18M), batch 8 x 512, AdamW", _tiny_llama_mha, _tokens(8, 512),
                        lm_loss, _adamw),
    "mlp-adam-mini": ("MLP 512-2048-2048-10 (5.3M), batch 4096, Adam-mini", _mlp,
                      lambda device="cpu": (torch.zeros(4096, 512, device=device),
                                            torch.zeros(4096, dtype=torch.long, device=device)), _mlp_loss,
                      _adam_mini),
    "gpt2-124m-adamw": ("gpt2-124m config, batch 4 x 512, AdamW", lambda: build_config_model("gpt2-124m", "cpu"),
                        _tokens(4, 512), lm_loss, _adamw),
}


def estimate(name: str) -> int:
    _, build, make_batch, loss_fn, make_opt = CASES[name]
    return trace_peak(build, make_batch, loss_fn, make_opt).peak


def _measure_cpu(name: str) -> dict:
    _, build, make_batch, loss_fn, make_opt = CASES[name]
    torch.set_num_threads(1)
    small = (lambda: resized_batch(make_batch(), 1))
    measure_peak(build, small, loss_fn, make_opt)                  # warm-up: kernels, pools, lazy imports
    return {"allocated": measure_peak(build, make_batch, loss_fn, make_opt)}


def measured(name: str, device: str) -> dict:
    if device == "cpu":
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, "--_one", name], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    _, build, make_batch, loss_fn, make_opt = CASES[name]
    measure_peak(build, lambda: resized_batch(make_batch(device), 1, device=device), loss_fn, make_opt,
                 device=device)   # warm-up
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    reserved_before = torch.cuda.memory_reserved(device)
    allocated = measure_peak(build, lambda: make_batch(device), loss_fn, make_opt, device=device)
    return {"allocated": allocated, "reserved": torch.cuda.max_memory_reserved(device) - reserved_before}


def trace_seconds(name: str) -> float:
    t0 = time.perf_counter()
    trace_forward_backward(lambda: build_config_model(name), _tokens(1, 2048), lm_loss, param_dtype=torch.bfloat16)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="all")
    ap.add_argument("--no-big", action="store_true", help="skip timing the 7B and 70B traces")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(_measure_cpu(args._one)))
        return
    names = list(CASES) if args.cases == "all" else args.cases.split(",")
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "device": args.device}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(args.device)
    rows = []
    for name in names:
        est, real = estimate(name), measured(name, args.device)
        rows.append({"case": name, "description": CASES[name][0], "estimate": est, **real,
                     "ratio": real["allocated"] / est})
    big = {} if args.no_big else {n: trace_seconds(n) for n in ("llama2-7b", "llama2-70b")}
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows, "trace_seconds_bf16_1x2048": big}, indent=2))
        return
    print(f"machine: {machine}")
    print(f"{'case':48s} {'estimate MiB':>13s} {'measured MiB':>13s} {'measured/est':>13s}"
          + (f" {'reserved MiB':>13s}" if args.device != "cpu" else ""))
    for r in rows:
        line = f"{r['description']:48s} {r['estimate'] / 2**20:13.1f} {r['allocated'] / 2**20:13.1f} {r['ratio']:13.4f}"
        if "reserved" in r:
            line += f" {r['reserved'] / 2**20:13.1f}"
        print(line)
    for n, s in big.items():
        print(f"one forward+backward trace of {n} (bf16, 1 x 2048) on fake tensors: {s:.1f} s")


if __name__ == "__main__":
    main()
