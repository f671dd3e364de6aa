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

from lowmem.compress.formats import BLOCK_4BIT, BLOCK_8BIT, quantized_nbytes

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
        low, high = torch.aminmax(xb, dim=-1)                                   # one pass, no |x| copy
        s = torch.maximum(high, low.neg_()).clamp_(min=1e-12)
        normed = (xb / s[..., None]).reshape(xb.shape[0], -1)
        out = codes[r:r + step]
        if normed.shape[1] != length:                                           # padded: codes of the row
            normed = normed[:, :length]
        if out.is_contiguous():
            enc.nearest(normed, out=out)
        else:
            out.copy_(enc.nearest(normed))
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
    """Nearest map value of float32 entries in [−1, 1] with torchao's rule (``x − q[lo] >=
    (q[hi] − q[lo]) · 0.5`` takes ``hi``), exactly, by table lookup instead of a search.

    The rule is monotone in x, so between two neighbouring map values there is one smallest
    float32 at which it switches to the upper one (its *threshold*, found once by bisecting the
    float32 numbers). The upper `_CELL_BITS` bits of an entry (sign, exponent, leading mantissa
    bits) name a cell of consecutive floats; the table holds the code of each cell's lowest
    value and the thresholds that fall inside the cell (`steps` of them at most, +inf where
    fewer), so a code is the cell's code plus the number of its thresholds at or below x.
    """

    def __init__(self, qmap: torch.Tensor, device: torch.device):
        q = qmap.detach().to(torch.float32).cpu()
        thresholds = _switch_points(q)                                      # (len(q) − 1,) float32
        tops = torch.arange(1 << _CELL_BITS, dtype=torch.int64) << (32 - _CELL_BITS)
        ends = torch.stack((tops, tops | ((1 << (32 - _CELL_BITS)) - 1))).to(torch.int32).view(torch.float32)
        ends = torch.where(torch.isfinite(ends).all(dim=0), ends, 0.0).clamp(-1.0, 1.0)   # inf/NaN cells: unused
        low, high = ends.min(dim=0).values, ends.max(dim=0).values
        self.base = torch.searchsorted(thresholds, low, right=True).to(torch.int32)   # thresholds <= low
        inside = torch.searchsorted(thresholds, high, right=True).to(torch.int32) - self.base
        self.steps = int(inside.max())
        padded = torch.cat((thresholds, torch.full((self.steps + 1,), torch.inf)))
        self.cuts = [torch.where(inside > k, padded[(self.base + k).long()], torch.inf).to(device)
                     for k in range(self.steps)]
        self.base = self.base.to(device=device, dtype=torch.uint8)   # codes < 256

    def nearest(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 codes of `x` (float32 entries in [−1, 1]), written into `out` (contiguous,
        uint8, `x`'s shape) when given."""
        shape, x = x.shape, x.contiguous().view(-1)
        cell = x.view(torch.int32).bitwise_right_shift(32 - _CELL_BITS).bitwise_and_((1 << _CELL_BITS) - 1)
        code = torch.empty(x.shape, dtype=torch.uint8, device=x.device) if out is None else out.view(-1)
        torch.index_select(self.base, 0, cell, out=code)    # index_select: fast with int32 indices
        for cut in self.cuts:
            code.add_(x >= torch.index_select(cut, 0, cell))
        return code.view(shape)


_CELL_BITS = 17   # sign, 8 exponent bits and 8 mantissa bits: a cell spans 2^-8 of its values' size


def _switch_points(q: torch.Tensor) -> torch.Tensor:
    """For each pair of neighbouring map values, the smallest float32 x with
    ``fl(x − q[i]) >= fl((q[i+1] − q[i]) · 0.5)``: where the nearest code turns from i to i+1."""
    lo, hi = q[:-1], q[1:]
    half = (hi - lo) * 0.5
    a, b = _order(lo), _order(hi)          # the rule is false at lo and true at hi: bisect between
    while bool((b - a > 1).any()):
        mid = (a + b) // 2
        up = (_float(mid) - lo) >= half
        a, b = torch.where(up, a, mid), torch.where(up, mid, b)
    return _float(b)


def _order(x: torch.Tensor) -> torch.Tensor:
    """float32 → int64 keys in the order of the floats (both zeros → 0)."""
    bits = x.view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _float(key: torch.Tensor) -> torch.Tensor:
    """`_order`'s inverse."""
    bits = torch.where(key >= 0, key, (-key) | 0x80000000)            # the uint32 bit pattern
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


_encoders: dict = {}


def _encoder(qmap: torch.Tensor, device: torch.device) -> _Encoder:
    """The encoder of `qmap` on `device`, built once per map: found by the tensor itself (kept
    alive with its encoder, so its id is not reused), else for a CPU map by its values (maps made
    afresh at every call share one; a map on a device is not copied to the host at every call).
    A map seen before is found without reading its values, so the lookup also works under the
    fake-tensor mode of `lowmem.compress.peak`, where a real tensor's values cannot be read."""
    by_id = (id(qmap), qmap._version, str(device))
    enc = _encoders.get(by_id)
    if enc is not None and enc.source is qmap:
        return enc
    by_value = (qmap.detach().numpy().tobytes(), str(device)) if qmap.device.type == "cpu" else None
    enc = _encoders.get(by_value)
    if enc is None:
        enc = _Encoder(qmap, device)
    while len(_encoders) >= 64:   # maps made afresh on a device at every call: forget the oldest
        _encoders.pop(next(iter(_encoders)))
    enc.source = qmap
    _encoders[by_id] = enc
    if by_value is not None:
        _encoders[by_value] = enc
    return enc


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the low nibble; an odd count is padded with 0
    (`pack_rows` of one row)."""
    return pack_rows(codes.reshape(1, -1).to(torch.uint8)).reshape(-1)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` codes `pack_4bit` packed."""
    return unpack_rows(packed.reshape(1, -1), n).reshape(-1)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (R, L) packed two to a byte within each row: (R, ceil(L/2)), the even entry
    in the low nibble; an odd row is padded with a 0 code."""
    c = torch.nn.functional.pad(codes, (0, codes.shape[1] % 2))
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_rows(packed: torch.Tensor, length: int) -> torch.Tensor:
    """The (R, length) codes `pack_rows` packed."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=2).reshape(packed.shape[0], 2 * packed.shape[1])[:, :length]


__all__ = ["BLOCK_4BIT", "BLOCK_8BIT", "MAPS", "block_scales", "dequantize", "dynamic_map", "pack_4bit",
           "dequantize_rows", "pack_rows", "quantization_map", "quantize", "quantize_rows", "quantized_nbytes",
           "unpack_4bit", "unpack_rows"]
