"""The lowmem loop under FSDP2: probe with AdamW on a sharded model, build a plan, train with it.

    torchrun --nproc-per-node 2 examples/fsdp_train.py [--steps 60] [--out lowmem-out/fsdp]
    python examples/fsdp_train.py --world 2             # the same, starting its own processes (CPU, gloo)

The built-in Shakespeare GPT (`lowmem.examples.shakespeare`) is sharded with `fully_shard` (each
block, then the root). Every rank attaches `lowmem.capture` (a measurement is collective: the
SNR of the whole `v` from per-shard partial sums; rank 0 writes the CSV), rank 0 builds the plan,
and a fresh sharded model trains with the plan's optimizer. Each rank takes its slice of every
batch, so the run is data parallel too. On GPUs the backend is NCCL and each rank its own device.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import lowmem
from lowmem.examples import shakespeare

lr = 1e-3


def sharded_model() -> torch.nn.Module:
    torch.manual_seed(0)                                   # the same initial weights on every rank
    model = shakespeare.build_model().to(_device())
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def train(model, opt, steps: int, capture_to: Path | None = None) -> float:
    rank, world = dist.get_rank(), dist.get_world_size()
    cap = lowmem.capture(opt, model, every=5, out=capture_to) if capture_to else None   # on every rank
    try:
        for step in range(steps):
            x, y = (t.to(_device()) for t in shakespeare.get_batch(step))      # (B, T) each
            rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)   # this rank's sequences
            loss = shakespeare.loss_fn(model, (x[rows], y[rows]))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        if cap is not None:
            cap.close()
    loss = loss.detach().reshape(1)
    dist.all_reduce(loss)
    return loss.item() / world


def state_bytes(opt) -> int:
    """This rank's optimizer state (its shards and what it keeps whole), without step counters."""
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


def run(steps: int, out: Path) -> dict:
    rank = dist.get_rank()
    probe = sharded_model()
    adamw = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    probe_loss = train(probe, adamw, steps, capture_to=out / "snr.csv")
    if rank == 0:
        lowmem.build_plan(probe, lowmem.SnrTrajectory.read(out / "snr.csv")).save(out / "plan.json")
    dist.barrier()                                         # the plan is on disk for every rank
    plan = lowmem.Plan.load(out / "plan.json")
    model = sharded_model()
    opt = lowmem.optimizer_from_plan(model, plan, lr=lr, weight_decay=0.0)
    loss = train(model, opt, steps)
    mine = torch.tensor([state_bytes(adamw), state_bytes(opt)], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    if rank == 0:
        fmt = lowmem.compress.format_bytes
        print(f"{dist.get_world_size()} ranks: plan ({plan.summary['v_saved']:.1%} of v saved) -> {out / 'plan.json'}; "
              f"loss after {steps} steps {probe_loss:.3f} with AdamW, {loss:.3f} with the plan; optimizer state "
              f"per rank {fmt(mine[1].item())} instead of AdamW's {fmt(mine[0].item())}")
    return {"plan": out / "plan.json", "adamw_loss": probe_loss, "plan_loss": loss,
            "adamw_bytes": mine[0].item(), "plan_bytes": mine[1].item()}


def _spawned(rank: int, world: int, port: int, steps: int, out: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _main(steps, Path(out), results)


def _main(steps: int, out: Path, results: str | None = None) -> dict:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(_device())
    try:
        out.mkdir(parents=True, exist_ok=True)
        result = run(steps, out)
        if results and dist.get_rank() == 0:
            torch.save({k: str(v) if isinstance(v, Path) else v for k, v in result.items()}, results)
        dist.barrier()     # no rank tears gloo down while another still talks to it (an abort at exit)
        return result
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="lowmem-out/fsdp")
    p.add_argument("--world", type=int, default=None, help="start this many processes here (without torchrun)")
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)     # for the test: rank 0's numbers
    args = p.parse_args(argv)
    if args.world is None:                                 # under torchrun: this process is one rank
        _main(args.steps, Path(args.out), args.results)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(args.world, port, args.steps, args.out, args.results), nprocs=args.world,
                       join=True, start_method="spawn")


if __name__ == "__main__":
    main()
