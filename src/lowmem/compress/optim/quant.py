"""Block-wise quantized storage for optimizer state: codes of 8 or 4 bits and one fp32 scale per
block (the first piece of low-precision state; the optimizers do not use it yet).

Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization" (2022):
a tensor is cut into blocks of `BLOCK_8BIT` (or `BLOCK_4BIT`) entries in its flat order; each block
is divided by its largest magnitude (its absmax, the block's scale), so every entry lies in
[−1, 1], and each entry is stored as the index of the nearest value of a fixed map of 2^bits
values (ties go to the larger value). The last block may be shorter: blocks never straddle the
end of a tensor, so each tensor quantizes on its own (and an FSDP2 shard's rows on their own).

Maps (`quantization_map`):
- ``"dynamic"`` (signed, for `m`) and ``"dynamic-unsigned"`` (for `v`): the dynamic tree map of
  Dettmers (2016), as bitsandbytes and torchao build it: for each decade 10^−k, a number of
  values that doubles with every decade closer to 1, at the midpoints of an even split of
  [0.1, 1] scaled by the decade; plus 0 and 1. Small entries keep relative precision.
- ``"linear"``: 2^bits evenly spaced values in [−1, 1] (absmax linear quantization).

4-bit codes are packed two to a byte (`pack_4bit`).
"""

from __future__ import annotations

import math

import torch

BLOCK_8BIT = 256   # entries per scale for 8-bit codes, as torchao's AdamW8bit
BLOCK_4BIT = 128   # entries per scale for 4-bit codes, as torchao's AdamW4bit
MAPS = ("dynamic", "dynamic-unsigned", "linear")


def dynamic_map(signed: bool, bits: int = 8, exponent_bits: int | None = None) -> torch.Tensor:
    """The dynamic tree map: 2^bits sorted float32 values in [−1, 1] (``signed``) or [0, 1].

    With E = `exponent_bits` (default bits − 1) decades 10^−(E−1) … 10^0, decade i (0-based from
    the smallest) holds 2^(i + bits − 1 − E) values in a signed map (and their negatives) or
    2^(i + bits − E) in an unsigned one: the midpoints of an even split of [0.1, 1] into that
    many intervals, times the decade. Bit patterns the decades leave over (when E < bits − 1)
    add midpoints of an even split into that many intervals at the largest decade; then 0 and 1.
    Computed in float32 as bitsandbytes and torchao do, so the values are theirs bit for bit.
    """
    e = bits - 1 if exponent_bits is None else exponent_bits
    if not 1 <= e <= bits - 1:
        raise ValueError(f"exponent_bits must be in [1, {bits - 1}], got {e}")
    free = bits - 1
    values: list[float] = []

    def add(intervals: int, decade: float) -> None:
        edges = torch.linspace(0.1, 1, intervals + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0 * decade                     # float32, as theirs
        values.extend(mids.tolist())
        if signed:
            values.extend((-mids).tolist())

    for i in range(e):
        add(2 ** (i + free - e + (0 if signed else 1)), 10.0 ** (i - (e - 1)))
    if 2 ** (free - e) - 1 > 0:
        add(2 ** (free - e) - 1, 1.0)
    values += [0.0, 1.0]
    if len(values) != 2 ** bits:   # an unsigned map of this many exponent bits does not fill the codes
        raise ValueError(f"a {'signed' if signed else 'unsigned'} dynamic map of {bits} bits and {e} exponent "
                         f"bits has {len(values)} values, not {2 ** bits}")
    return torch.tensor(sorted(values), dtype=torch.float32)


def quantization_map(kind: str, bits: int) -> torch.Tensor:
    """The map `kind` (one of `MAPS`) with 2^bits values; 4-bit dynamic maps use 3 exponent bits
    (torchao's choice for its 4-bit `m`)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if kind == "linear":
        return torch.linspace(-1, 1, 2 ** bits)
    if kind in ("dynamic", "dynamic-unsigned"):
        return dynamic_map(kind == "dynamic", bits, None if bits == 8 else 3)
    raise ValueError(f"unknown quantization map {kind!r}; known: {', '.join(MAPS)}")


def block_scales(x: torch.Tensor, block: int) -> torch.Tensor:
    """The absmax of each block of `x`'s flat order (the last one may be shorter), at least 1e-12
    so a block of zeros divides safely; float32, ``ceil(numel / block)`` entries."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block)   # zeros never raise an absmax
    return padded.abs().amax(dim=1).clamp_(min=1e-12)


def quantize(x: torch.Tensor, qmap: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of `x`: uint8 codes, one per entry in flat order (4-bit maps too: pack them
    with `pack_4bit`), and the float32 scale of each block.

    Each entry divided by its block's scale is stored as the index of the nearest map value;
    exactly halfway between two values it takes the larger, as torchao does.
    """
    scales = block_scales(x, block)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    normed = (torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block) / scales[:, None]).reshape(-1)[:n]
    qmap = qmap.to(device=flat.device, dtype=torch.float32)
    below = (torch.searchsorted(qmap, normed, right=True) - 1).clamp_(0, qmap.numel() - 1)   # qmap[below] <= v
    above = (below + 1).clamp_(max=qmap.numel() - 1)
    low, high = qmap[below], qmap[above]
    codes = torch.where(normed - low >= (high - low) * 0.5, above, below)
    return codes.to(torch.uint8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor, block: int,
               shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of `shape` that `quantize` stored as (codes, scales)."""
    n = math.prod(shape)
    values = qmap.to(device=codes.device, dtype=torch.float32)[codes.reshape(-1)[:n].long()]
    values = torch.nn.functional.pad(values, (0, -n % block)).view(-1, block) * scales[:, None]
    return values.reshape(-1)[:n].view(shape)


def quantized_nbytes(n: int, bits: int, block: int) -> int:
    """Bytes that `n` entries take as `bits`-bit codes (4-bit codes packed two to a byte) plus one
    fp32 scale per block of `block` entries (the last block may be shorter)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return -(-n * bits // 8) + 4 * -(-n // block)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the low nibble; an odd count is padded with 0."""
    c = torch.nn.functional.pad(codes.reshape(-1).to(torch.uint8), (0, codes.numel() % 2))
    return c[0::2] | (c[1::2] << 4)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` codes `pack_4bit` packed."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=1).reshape(-1)[:n]


__all__ = ["BLOCK_4BIT", "BLOCK_8BIT", "MAPS", "block_scales", "dequantize", "dynamic_map", "pack_4bit",
           "quantization_map", "quantize", "quantized_nbytes", "unpack_4bit"]
