"""Real training steps beside the traced peaks: ``lowmem-analyze memory --measure``.

Each optimizer of the peak table trains the model for two real steps on a device at the traced
settings (batch, sequence, parameter dtype, autocast, checkpointing), and its measured peak is
shown beside the trace (`lowmem.compress.peak.measure_peak`):

- on CUDA, in this process: ``max_memory_allocated`` above what was allocated before, and
  ``max_memory_reserved`` above what was reserved (what the caching allocator took from the
  device, fragmentation included), after a warm-up step at batch 1 (kernels, cuBLAS workspaces);
- on the CPU (Linux), each optimizer in a fresh process whose glibc maps every allocation of
  64 KiB or more on its own, so freed tensors leave the resident set: the peak resident set
  size above its size before the model was built, after a warm-up at batch 1.

A row whose traced peak does not fit in the device's free memory (with a fifth for headroom) is
not run; the row says so. The work of one row is described by a JSON-able `spec`, so the CPU
worker (``python -m lowmem.cli.measure SPEC NAME``) rebuilds it alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch

from lowmem.compress.peak import DTYPES, lm_loss, measure_peak, resized_batch
from lowmem.hessian.exact import available_memory

__all__ = ["free_memory", "measure_one", "measure_rows"]

HEADROOM = 1.2    # a row runs when its traced peak times this fits in the free memory


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` now (CUDA: the driver's count; CPU: ``MemAvailable``; None where
    unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        items = [_to(x, device) for x in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, dict):
        return type(batch)((k, _to(v, device)) for k, v in batch.items())
    return batch


def _pieces(spec: dict, name: str, device: torch.device):
    """(build_model, make_batch(b), loss_fn, make_optimizer) of `spec`'s model and optimizer `name`."""
    from lowmem.cli.peak import peak_optimizers
    from lowmem.compress import Plan
    from lowmem.compress.formats import StateFormat

    plan = Plan.load(spec["plan"]) if spec.get("plan") else None
    formats = tuple(StateFormat.parse(f) for f in spec["state"]) if spec.get("state") else None
    make_optimizer = peak_optimizers(plan, formats)[name]
    batch, seq = spec.get("batch"), spec.get("seq")
    if spec.get("config"):
        from lowmem.compress.configs import build_config_model

        def build():
            return build_config_model(spec["config"], device)

        return build, (lambda b: torch.zeros(b or batch, seq, dtype=torch.long, device=device)), lm_loss, make_optimizer
    from lowmem.cli.contract import load_example, load_task

    task = load_example(spec["example"]) if spec.get("example") else load_task(spec["target"])
    example = task.get_batch(0)

    def make_batch(b):
        if b is None and batch is None and seq is None:
            return _to(example, device)        # the model's own batch, values and all
        return resized_batch(example, b or batch, seq, device=device)

    return task.build_model, make_batch, task.loss_fn, make_optimizer


def measure_one(spec: dict, name: str, device: torch.device | str) -> dict:
    """``{"allocated": bytes, "reserved": bytes or None}``: the measured peak of two real steps
    of `spec`'s model with optimizer `name` on `device`, after a warm-up at batch 1."""
    device = torch.device(device)
    build, make_batch, loss_fn, make_opt = _pieces(spec, name, device)
    kw = dict(device=device, param_dtype=DTYPES[spec.get("param_dtype") or "fp32"],
              autocast=DTYPES[spec["autocast"]] if spec.get("autocast") else None,
              checkpointing=bool(spec.get("checkpointing")))
    measure_peak(build, lambda: make_batch(1), loss_fn, make_opt, **kw)          # warm-up
    if device.type != "cuda":
        return {"allocated": measure_peak(build, lambda: make_batch(None), loss_fn, make_opt, **kw), "reserved": None}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    reserved = torch.cuda.memory_reserved(device)
    allocated = measure_peak(build, lambda: make_batch(None), loss_fn, make_opt, **kw)
    out = {"allocated": allocated, "reserved": torch.cuda.max_memory_reserved(device) - reserved}
    torch.cuda.empty_cache()
    return out


def measure_rows(spec: dict, traced: dict[str, int | None], device: torch.device) -> dict[str, dict]:
    """Per optimizer name of `traced` (name -> traced peak, None where it could not be traced):
    ``{"allocated", "reserved"}`` measured on `device`, or ``{"note": why not}``."""
    out = {}
    for name, peak in traced.items():
        free = free_memory(device)
        if peak is None:
            out[name] = {"note": "not traced, so not run: its size here is unknown"}
        elif free is not None and peak * HEADROOM > free:
            out[name] = {"note": f"not run: its traced peak ({peak:,} bytes) and a fifth for headroom exceed the "
                                 f"{free:,} bytes free on {device}"}
        elif device.type == "cuda":
            try:
                out[name] = measure_one(spec, name, device)
            except KeyboardInterrupt:
                raise
            except Exception as e:      # out of memory, the user's code: a note on the row, not the end
                first = str(e).splitlines()[0] if str(e) else ""
                out[name] = {"note": f"the real steps failed ({type(e).__name__}: {first})"}
            torch.cuda.empty_cache()    # (after the handler: the failed row's frames are gone)
        else:
            out[name] = _in_fresh_process(spec, name)
    return out


def _in_fresh_process(spec: dict, name: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lowmem.cli.measure", json.dumps(spec), name], env=env,
                          capture_output=True, text=True)
    if done.returncode == 0:
        for line in reversed(done.stdout.strip().splitlines()):   # the worker's line is the last JSON one
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and "allocated" in doc:
                return doc
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"note": f"the real steps failed ({last})"}


if __name__ == "__main__":    # the CPU worker: one optimizer, printed as one JSON line
    torch.set_num_threads(1)
    print(json.dumps(measure_one(json.loads(sys.argv[1]), sys.argv[2], "cpu")))
