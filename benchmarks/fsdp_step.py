"""Optimizer step time on FSDP2-sharded parameters, each lowmem optimizer as a ratio to torch's
AdamW on the same sharded model in the same run.

    python benchmarks/fsdp_step.py [--world 2] [--layers 4] [--width 512] [--mlp 1408] [--heads 8]
        [--vocab 8192] [--rounds 8] [--steps 3] [--warmup 2] [--threads 1] [--json]

`--world` processes (gloo, CPU) each `fully_shard` a Llama-shaped parameter layout
(`lowmem.compress.configs.LlamaConfig`: embedding, `--layers` layers of q, k, v, o and a gated
MLP, RMSNorms, an untied LM head; default 21,238,272 parameters) per layer and at the
root, so every parameter is a DTensor sharded along dim 0. Gradients are random DTensors drawn
once and never recomputed: only ``opt.step()`` is timed, in blocks of `--steps` steps between
two barriers, on every rank (the slowest rank's time is reported). Rows run interleaved in
`--rounds` rounds, the order rotated every round; ms/step is the median over rounds, ratios are
medians of per-round paired ratios to ``torch.optim.AdamW(foreach=True)`` (what FSDP2 uses by
default).

What the ratio says: lowmem's plan optimizers run on each rank's shard through the engine's
default (foreach) backend, with one all-reduce of partial sums per bucket (one per step when all
sharded parameters share a dtype and step count) for means across shards;
AdaMeM and Adafactor-momentum all-reduce partial sums once or twice per parameter (AdaMeM
gathers a gradient only to refresh its projector, every `update_proj_gap` steps). The script is
a measurement and always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, load_average   # beside this script  # noqa: E402

import lowmem  # noqa: E402
from lowmem.compress.configs import LlamaConfig  # noqa: E402


def build(args) -> nn.Module:
    """A Llama-shaped parameter layout (`lowmem.compress.configs`; no forward is needed: only
    ``opt.step()`` is timed, on random gradients)."""
    config = LlamaConfig(args.layers, args.width, args.mlp, args.heads, args.heads, vocab_size=args.vocab)
    return config.build("cpu")


def optimizers(model):
    return {
        "AdamW (foreach)": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
        "SlimAdam (rules)": lambda: lowmem.SlimAdam(model, lr=1e-3),
        "Eve": lambda: lowmem.Eve(model, lr=1e-3),
        "Adam-mini": lambda: lowmem.AdamMini(model, lr=1e-3),
        "AdaLayer": lambda: lowmem.AdaLayer(model, lr=1e-3),
        "AdaMeM": lambda: lowmem.AdaMeM(model, lr=1e-3),
        "Adafactor-momentum": lambda: lowmem.AdafactorMomentum(model),
    }


def _worker(rank: int, args, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    try:
        names, models, opts = [], {}, {}
        torch.manual_seed(0)
        base = build(args)
        grads = {n: torch.randn_like(p) * 1e-3 for n, p in base.named_parameters()}
        for name in optimizers(base):
            model = build(args)
            model.load_state_dict(base.state_dict())
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            for n, p in model.named_parameters():     # the same random gradient, sharded like p
                p.grad = distribute_tensor(grads[n], p.device_mesh, p.placements)
            names.append(name)
            models[name] = model
            opts[name] = optimizers(model)[name]()
        n_params = sum(p.numel() for p in base.parameters())
        for name in names:
            for _ in range(args.warmup):
                opts[name].step()
        times = {name: [] for name in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    opts[name].step()
                dist.barrier()
                elapsed = torch.tensor((time.perf_counter() - t0) / args.steps)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[name].append(elapsed.item())
        state = {}
        for name in names:
            local = 0
            for st in opts[name].state.values():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and k != "step":
                        t = v.to_local() if hasattr(v, "to_local") else v
                        local += t.numel() * t.element_size()
            total = torch.tensor(float(local))
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
            state[name] = total.item()
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"params": n_params, "times": times, "state_bytes_max_rank": state}, f)
        dist.barrier()     # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--mlp", type=int, default=1408, help="the MLP's inner width")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lowmem-fsdp-step-{os.getpid()}.json")
    mp.start_processes(_worker, args=(args, _free_port(), out), nprocs=args.world, join=True, start_method="spawn")
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    ref = res["times"]["AdamW (foreach)"]
    rows = []
    for name, ts in res["times"].items():
        ratio = statistics.median(t / r for t, r in zip(ts, ref))
        rows.append({"optimizer": name, "ms_per_step": 1e3 * statistics.median(ts), "ratio_to_adamw": ratio,
                     "state_mib_per_rank": res["state_bytes_max_rank"][name] / 2**20})
    meta = {"machine": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "world": args.world,
            "threads_per_rank": args.threads, "params": res["params"], "load": load_average(),
            "layers": args.layers, "width": args.width, "mlp": args.mlp, "heads": args.heads, "vocab": args.vocab,
            "rounds": args.rounds, "steps": args.steps}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    print(f"FSDP2 optimizer step, {args.world} gloo ranks x {args.threads} thread(s), {res['params']:,} parameters "
          f"(Llama-shaped: {args.layers} layers, width {args.width}, MLP {args.mlp}, {args.heads} heads, vocab "
          f"{args.vocab:,}); {meta['machine']}, "
          f"torch {torch.__version__}")
    print(f"{'optimizer':<22}{'ms/step':>10}{'x AdamW':>10}{'state MiB/rank':>16}")
    for r in rows:
        print(f"{r['optimizer']:<22}{r['ms_per_step']:>10.1f}{r['ratio_to_adamw']:>10.2f}{r['state_mib_per_rank']:>16.1f}")


if __name__ == "__main__":
    main()
