"""Optimizer state kept in a storage format (`lowmem.compress.formats`): allocated, decoded into a
compute-dtype temporary for a step, and encoded back.

A state in format

- ``fp32`` is one tensor in the compute dtype (fp32, or fp64 for fp64 parameters): the key alone;
- ``bf16`` is one bf16 tensor under the key (decoded exactly, encoded by round-to-nearest);
- ``int8`` / ``int4`` is the codes under the key, uint8, shape (rows, L) for 8 bits or
  (rows, ceil(L/2)) for 4 bits packed two to a byte within each row, and ``<key>_scale``, the
  fp32 absmax of each block of each row, shape (rows, ceil(L/B)) (`quant.quantize_rows`). `m`
  takes the signed dynamic map, `v` the unsigned one (torchao's and bitsandbytes' choice). Zero
  scales decode to zero, which is how a fresh state starts.

Rows are dim 0 of the parameter, so every tensor of a state has the parameter's rows as its dim
0, and a row-sharded (FSDP2) parameter's states shard like it.
"""

from __future__ import annotations

import torch

from lowmem.compress.formats import QUANTIZED, block_of, rows_of
from lowmem.compress.optim.quant import dequantize_rows, pack_rows, quantization_map, quantize_rows, unpack_rows

KEYS = {"m": "exp_avg", "v": "exp_avg_sq"}
MAPS = {"m": "dynamic", "v": "dynamic-unsigned"}


def scale_key(which: str) -> str:
    return KEYS[which] + "_scale"


_QMAPS: dict = {}


def _qmap(which: str, fmt: str, device: torch.device) -> torch.Tensor:
    """The map of `which`'s codes in `fmt` on `device` (built once)."""
    key = (which, fmt, str(device))
    if key not in _QMAPS:
        _QMAPS[key] = quantization_map(MAPS[which], QUANTIZED[fmt]).to(device)
    return _QMAPS[key]


def stored_shapes(fmt: str, shape) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """{suffix: (shape, dtype)} of the tensors of a state of `shape` in `fmt` (dtype None: the
    compute dtype); suffix ``""`` is the key itself, ``"_scale"`` its scales."""
    shape = tuple(shape)
    if fmt == "fp32":
        return {"": (shape, None)}
    if fmt == "bf16":
        return {"": (shape, torch.bfloat16)}
    rows, length = rows_of(shape)
    width = length if QUANTIZED[fmt] == 8 else -(-length // 2)
    return {"": ((rows, width), torch.uint8), "_scale": ((rows, -(-length // block_of(fmt))), torch.float32)}


def allocate(which: str, fmt: str, shape, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Zero state of `shape` in `fmt`, as {state key: tensor}."""
    return {KEYS[which] + suffix: torch.zeros(s, dtype=d or dtype, device=device)
            for suffix, (s, d) in stored_shapes(fmt, shape).items()}


def decode(which: str, fmt: str, state: dict, shape, dtype: torch.dtype) -> torch.Tensor:
    """The state as a tensor of `shape` in the compute `dtype` (local tensors in `state`): a new
    one, except a state already in that dtype (``fp32``), which is returned itself, so a step
    updates it in place and `encode_` has nothing to write."""
    stored = state[KEYS[which]]
    if fmt == "fp32" and stored.dtype == dtype:
        return stored.view(shape)
    if fmt in ("fp32", "bf16"):
        return stored.to(dtype=dtype, copy=True).view(shape)
    rows, length = rows_of(tuple(shape))
    codes = stored if QUANTIZED[fmt] == 8 else unpack_rows(stored, length)
    out = dequantize_rows(codes, state[scale_key(which)], _qmap(which, fmt, stored.device), block_of(fmt))
    return (out if dtype == torch.float32 else out.to(dtype)).view(shape)


def encode_(which: str, fmt: str, x: torch.Tensor, state: dict) -> None:
    """Store `x` (compute dtype) into the state's tensors in place."""
    stored = state[KEYS[which]]
    if fmt in ("fp32", "bf16"):
        if x.data_ptr() != stored.data_ptr():   # (`decode` hands out an fp32 state itself)
            stored.copy_(x.view(stored.shape))
        return
    rows, length = rows_of(tuple(x.shape))
    x2 = x.reshape(rows, length)
    scales = state[scale_key(which)]
    if QUANTIZED[fmt] == 8:
        quantize_rows(x2, _qmap(which, fmt, x.device), block_of(fmt), codes=stored, scales=scales)
    else:
        codes, _ = quantize_rows(x2, _qmap(which, fmt, x.device), block_of(fmt), scales=scales)
        stored.copy_(pack_rows(codes))


def roundtrip(which: str, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """`x` stored in `fmt` and read back (float32): what a step would see next time. For
    measuring the error a format causes (`lowmem.snr` precision measurement)."""
    x = x.detach().float()
    if fmt == "fp32":
        return x.clone()
    state = allocate(which, fmt, x.shape, torch.float32, x.device)
    encode_(which, fmt, x, state)
    return decode(which, fmt, state, x.shape, torch.float32)


__all__ = ["KEYS", "allocate", "decode", "encode_", "roundtrip", "scale_key", "stored_shapes"]
