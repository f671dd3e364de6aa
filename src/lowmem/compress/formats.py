"""Storage formats of optimizer state, per parameter: what a plan's ``state`` entry may say.

`m` (``exp_avg``) may be kept as ``fp32``, ``bf16``, ``int8`` or ``int4``; the `v` entries a
parameter keeps (``exp_avg_sq``) as ``fp32``, ``bf16`` or ``int8``. ``fp32`` means the
optimizer's compute dtype (fp32, or fp64 for fp64 parameters); the update is always computed in
it, and the result is stored back in the format.

The quantized formats (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022;
``lowmem.compress.optim.quant``) keep one code per entry and one fp32 scale (absmax) per block of
`BLOCK_8BIT` / `BLOCK_4BIT` entries, with the dynamic tree map: signed for `m`, unsigned for `v`.
Blocks run along each row of the parameter (its dim 0): a row of L entries holds ``ceil(L/B)``
blocks, so a row-sharded (FSDP2) rank quantizes its own rows exactly as a single process does.

Where a quantized format does not apply it falls back to fp32 (`effective_format`), as
bitsandbytes and torchao keep small tensors in 32 bits:

- tensors with fewer than `MIN_QUANTIZED_NUMEL` entries or fewer than 2 dims (biases, norm
  gains, scalars: few bytes, and the 8-bit optimizers paper's fragile cases), or with rows
  shorter than `MIN_QUANTIZED_ROW` entries (a block's fp32 scale would cost more than the
  codes save: a row of one entry would take 5 bytes);
- an ``int8`` `v` of a parameter whose `v` is not kept whole in the parameter's shape (averaged,
  or split into parts: its kept entries stay fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

M_FORMATS = ("fp32", "bf16", "int8", "int4")
V_FORMATS = ("fp32", "bf16", "int8")
QUANTIZED = {"int8": 8, "int4": 4}
BLOCK_8BIT = 256   # entries per scale for 8-bit codes, as torchao's AdamW8bit
BLOCK_4BIT = 128   # entries per scale for 4-bit codes, as torchao's AdamW4bit
MIN_QUANTIZED_NUMEL = 4096   # bitsandbytes' min_8bit_size and torchao's default threshold
MIN_QUANTIZED_ROW = 32       # int8 ≤ 1.125 B and int4 ≤ 0.625 B per entry with their scales


def block_of(fmt: str) -> int:
    """Entries per scale of a quantized format."""
    return BLOCK_8BIT if QUANTIZED[fmt] == 8 else BLOCK_4BIT


@dataclass(frozen=True)
class StateFormat:
    """How one parameter's `m` and kept `v` are stored (see the module docstring)."""

    m: str = "fp32"
    v: str = "fp32"

    def __post_init__(self):
        if self.m not in M_FORMATS:
            raise ValueError(f"m format must be one of {', '.join(M_FORMATS)}, got {self.m!r}")
        if self.v not in V_FORMATS:
            raise ValueError(f"v format must be one of {', '.join(V_FORMATS)}, got {self.v!r}")

    @property
    def full(self) -> bool:
        """Both kept in the compute dtype (what every plan meant before formats existed)."""
        return self.m == "fp32" and self.v == "fp32"

    def to_json(self) -> dict:
        return {"m": self.m, "v": self.v}

    @classmethod
    def from_json(cls, d) -> "StateFormat":
        if d is None:
            return FULL
        if not isinstance(d, dict) or set(d) - {"m", "v"}:
            raise ValueError(f"\"state\" must be an object with keys \"m\" and \"v\", found {d!r:.80}")
        return cls(d.get("m", "fp32"), d.get("v", "fp32"))

    @classmethod
    def parse(cls, text: str) -> "StateFormat":
        """``"m=int8,v=bf16"`` (either part may be left out) or a single ``"int8"`` for `m`."""
        items = [item.strip() for item in text.split(",") if item.strip()]
        pairs = [tuple(x.strip() for x in item.split("=", 1)) if "=" in item else ("m", item) for item in items]
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"state format {text!r} names {'m' if keys.count('m') > 1 else 'v'} twice")
        return cls.from_json(dict(pairs))

    def __str__(self) -> str:
        return f"m={self.m},v={self.v}"


FULL = StateFormat()


def quantizable(shape) -> bool:
    """Whether a state of this shape may be kept quantized (see the module docstring)."""
    return len(shape) >= 2 and math.prod(shape) >= MIN_QUANTIZED_NUMEL and rows_of(shape)[1] >= MIN_QUANTIZED_ROW


def effective_format(fmt: StateFormat, shape, v_full: bool) -> StateFormat:
    """The format a parameter of `shape` is actually stored in under `fmt` (quantized formats
    that do not apply fall back to fp32); `v_full`: its `v` is kept whole in the parameter's
    shape (full Adam, no parts: `LayerPlan.v_whole`)."""
    ok = quantizable(shape)
    m = fmt.m if fmt.m not in QUANTIZED or ok else "fp32"
    v = fmt.v if fmt.v not in QUANTIZED or (ok and v_full) else "fp32"
    return StateFormat(m, v)


def rows_of(shape) -> tuple[int, int]:
    """(rows, entries per row) of a state of `shape` for quantization: rows are dim 0."""
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 1 else (1, 1)


def stored_bytes(fmt: str, shape, compute_bytes: int = 4) -> int:
    """Bytes one state of `shape` takes in format `fmt` (codes, 4-bit codes packed two to a
    byte per row, and an fp32 scale per block of each row); `compute_bytes` for ``fp32``."""
    n = math.prod(shape)
    if fmt == "fp32":
        return n * compute_bytes
    if fmt == "bf16":
        return 2 * n
    rows, length = rows_of(shape)
    return rows * quantized_nbytes(length, QUANTIZED[fmt], block_of(fmt))


def quantized_nbytes(n: int, bits: int, block: int) -> int:
    """Bytes that `n` entries take as `bits`-bit codes (4-bit codes packed two to a byte) plus one
    fp32 scale per block of `block` entries (the last block may be shorter)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return -(-n * bits // 8) + 4 * -(-n // block)


__all__ = ["BLOCK_4BIT", "BLOCK_8BIT", "FULL", "MIN_QUANTIZED_NUMEL", "MIN_QUANTIZED_ROW", "M_FORMATS", "QUANTIZED", "StateFormat",
           "V_FORMATS", "block_of", "effective_format", "quantizable", "quantized_nbytes", "rows_of", "stored_bytes"]
