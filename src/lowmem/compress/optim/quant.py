"""Block-wise quantized storage for optimizer state: codes of 8 or 4 bits and one fp32 scale per
block (`lowmem.compress.optim.state` keeps optimizer state in it).

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

from lowmem.compress.formats import BLOCK_4BIT, BLOCK_8BIT

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
    return _blocked(x.detach().reshape(1, -1).float(), block).abs().amax(dim=-1).clamp_(min=1e-12).reshape(-1)


def quantize(x: torch.Tensor, qmap: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of `x` in flat order: uint8 codes, one per entry (4-bit maps too: pack them
    with `pack_4bit`), and the float32 scale of each block.

    Each entry divided by its block's scale is stored as the index of the nearest map value;
    exactly halfway between two values it takes the larger, as torchao does.
    """
    codes, scales = quantize_rows(x.detach().reshape(1, -1), qmap, block)
    return codes.reshape(-1), scales.reshape(-1)


def quantize_rows(x: torch.Tensor, qmap: torch.Tensor, block: int, codes: torch.Tensor | None = None,
                  scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize` of each row of a 2-D `x` (R, L) on its own: blocks of `block` entries along the
    row, the last one of a row possibly shorter. Returns codes (R, L) uint8 and scales
    (R, ceil(L / block)) float32, written into `codes` / `scales` when given. Works through the
    rows in chunks of about `_CHUNK` entries, so its temporaries stay small."""
    rows, length = x.shape
    nb = -(-length // block)
    codes = torch.empty((rows, length), dtype=torch.uint8, device=x.device) if codes is None else codes
    scales = torch.empty((rows, nb), dtype=torch.float32, device=x.device) if scales is None else scales
    enc = _encoder(qmap, x.device)
    step = max(1, _CHUNK // max(1, nb * block))
    for r in range(0, rows, step):
        xb = _blocked(x[r:r + step].float(), block)                              # (r, nb, block)
        s = xb.abs().amax(dim=-1).clamp_(min=1e-12)
        normed = (xb / s[..., None]).reshape(xb.shape[0], -1)[:, :length]
        codes[r:r + step] = enc.nearest(normed)
        scales[r:r + step] = s
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor, block: int,
               shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of `shape` that `quantize` stored as (codes, scales)."""
    n = math.prod(shape)
    return dequantize_rows(codes.reshape(1, -1)[:, :n], scales.reshape(1, -1), qmap, block).view(shape)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor, block: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 (R, L) tensor that `quantize_rows` stored as codes (R, L) and scales (R, nb),
    written into `out` when given."""
    rows, length = codes.shape
    qmap = qmap.to(device=codes.device, dtype=torch.float32)
    out = torch.empty((rows, length), dtype=torch.float32, device=codes.device) if out is None else out
    torch.index_select(qmap, 0, codes.reshape(-1).int(), out=out.view(-1))
    nb = scales.shape[1]
    if length == nb * block:
        out.view(rows, nb, block).mul_(scales[..., None])
    else:
        out.mul_(scales.repeat_interleave(block, dim=1)[:, :length])
    return out


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """A 2-D (R, L) tensor as (R, ceil(L / block), block), each row zero-padded to whole blocks
    (zeros never raise an absmax); a view when L is a multiple of `block`."""
    rows, length = x.shape
    pad = -length % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, -1, block)


_CHUNK = 1 << 20   # entries a quantizer works on at once (its int32/float32 temporaries: a few MiB)


class _Encoder:
    """Nearest map value of float32 entries in [−1, 1], exactly as a search would find it, with
    a table instead of a binary search: the upper 16 bits of an entry (sign, exponent and 7
    mantissa bits: a cell of values) index the largest code whose value is at or below the cell;
    at most `steps` map values lie inside one cell, so that many comparisons finish the search.
    Then ties go upward: ``x − q[lo] >= (q[hi] − q[lo]) · 0.5`` takes ``hi`` (torchao's rule)."""

    def __init__(self, qmap: torch.Tensor, device: torch.device):
        q = qmap.detach().to(torch.float32).cpu()
        tops = torch.arange(1 << 16, dtype=torch.int64).to(torch.int32) << 16        # each cell's upper bits
        ends = torch.stack((tops, tops | 0xFFFF)).view(torch.float32)                # its two extreme values
        ends = torch.where(torch.isfinite(ends).all(dim=0), ends, 0.0).clamp(-1.0, 1.0)   # inf/NaN cells: unused
        low, high = ends.min(dim=0).values, ends.max(dim=0).values
        below = lambda v: (torch.searchsorted(q, v, right=True) - 1).clamp(0, q.numel() - 1)   # noqa: E731
        self.table = below(low).to(torch.int32).to(device)
        self.steps = int((below(high) - below(low)).max())
        self.q = q.to(device)
        self.last = q.numel() - 1

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of `x` (float32 entries in [−1, 1])."""
        shape, x = x.shape, x.contiguous().view(-1)
        q, pick = self.q, lambda t, i: torch.index_select(t, 0, i)   # noqa: E731 (index_select: fast with int32)
        lo = pick(self.table, x.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF))
        for _ in range(self.steps):
            nxt = (lo + 1).clamp_(max=self.last)
            lo += (x >= pick(q, nxt)).to(torch.int32)
            lo.clamp_(max=self.last)
        hi = (lo + 1).clamp_(max=self.last)
        ql = pick(q, lo)
        up = (x - ql) >= (pick(q, hi) - ql).mul_(0.5)
        return torch.where(up, hi, lo).to(torch.uint8).view(shape)


_encoders: dict = {}


def _encoder(qmap: torch.Tensor, device: torch.device) -> _Encoder:
    key = (tuple(qmap.tolist()), str(device))
    enc = _encoders.get(key)
    if enc is None:
        enc = _encoders[key] = _Encoder(qmap, device)
    return enc


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
           "dequantize_rows", "quantization_map", "quantize", "quantize_rows", "quantized_nbytes", "unpack_4bit"]
