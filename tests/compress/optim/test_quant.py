"""Block-wise quantization of optimizer state against a numpy reference of the same scheme
(exact codes and scales), against torchao's maps and codes where torchao is installed, and
against hand-checked properties of the dynamic map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowmem.compress.optim.quant import (BLOCK_4BIT, BLOCK_8BIT, dequantize, dynamic_map, pack_4bit,
                                         quantization_map, quantize, quantized_nbytes, unpack_4bit)


def numpy_quantize(x: np.ndarray, qmap: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The scheme of Dettmers et al. (2022) in numpy, entry by entry: per block the absmax (at
    least 1e-12) as scale, each entry / scale (float32) to the nearest map value, ties upward."""
    flat = x.reshape(-1).astype(np.float32)
    scales, codes = [], []
    for start in range(0, flat.size, block):
        chunk = flat[start:start + block]
        scale = np.float32(max(np.abs(chunk).max(), np.float32(1e-12)))
        scales.append(scale)
        for v in chunk / scale:
            below = max(0, int(np.searchsorted(qmap, v, side="right")) - 1)
            above = min(below + 1, qmap.size - 1)
            up = np.float32(v - qmap[below]) >= np.float32(np.float32(qmap[above] - qmap[below]) * np.float32(0.5))
            codes.append(above if up else below)
    return np.array(codes, dtype=np.uint8), np.array(scales, dtype=np.float32)


def test_dynamic_maps_have_the_published_shape():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    for qmap in (signed, unsigned):
        assert qmap.dtype == torch.float32 and qmap.numel() == 256
        assert torch.all(qmap[1:] > qmap[:-1])                      # sorted, no value twice
        assert 0.0 in qmap.tolist() and qmap.max() == 1.0
    assert unsigned.min() == 0.0 and -1.0 < signed.min() < -0.99   # no -1: the sign halves each decade
    # the smallest decade (10^-6) holds one value of each sign: the midpoint of [0.1, 1], times 10^-6
    smallest = signed.abs()[signed != 0].min().item()
    assert smallest == pytest.approx(1e-6 * (0.1 + 0.9 / 2), rel=1e-6)   # decade 10^-6 holds one value
    assert dynamic_map(True, 4, 3).numel() == 16 and quantization_map("dynamic-unsigned", 4).numel() == 16


@pytest.mark.parametrize("kind, bits, block", [("dynamic", 8, BLOCK_8BIT), ("dynamic-unsigned", 8, BLOCK_8BIT),
                                               ("dynamic", 4, BLOCK_4BIT), ("linear", 8, BLOCK_8BIT)])
def test_codes_and_scales_equal_the_numpy_scheme_exactly(kind, bits, block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * block + 37, generator=g) * torch.logspace(-6, 1, 3 * block + 37)   # a ragged last block
    if kind == "dynamic-unsigned":
        x = x.abs()
    x[block:2 * block] = 0.0                                                 # a block of zeros
    qmap = quantization_map(kind, bits)
    codes, scales = quantize(x, qmap, block)
    want_codes, want_scales = numpy_quantize(x.numpy(), qmap.numpy(), block)
    np.testing.assert_array_equal(scales.numpy(), want_scales)
    np.testing.assert_array_equal(codes.numpy(), want_codes)
    assert scales.numel() == 4 and codes.numel() == x.numel()


def test_dequantize_is_within_half_a_map_step_of_each_entry():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g)
    qmap = quantization_map("dynamic", 8)
    codes, scales = quantize(x, qmap, BLOCK_8BIT)
    back = dequantize(codes, scales, qmap, BLOCK_8BIT, (1000,))
    # within half the widest gap of the map, or, for an entry near -scale, the gap from -1 to the
    # map's smallest value (the signed map has +1 but no -1)
    bound = max((qmap[1:] - qmap[:-1]).max().item() / 2, 1 + qmap.min().item())
    per_entry_scale = scales.repeat_interleave(BLOCK_8BIT)[:1000]
    assert torch.all((back - x).abs() <= (bound + 1e-6) * per_entry_scale)   # + float32 rounding of the value
    assert (back - x).abs().max() > 0.5 * bound * per_entry_scale.min()          # the bound is not loose
    unsigned = quantization_map("dynamic-unsigned", 8)
    codes, scales = quantize(x.abs(), unsigned, BLOCK_8BIT)
    assert dequantize(codes, scales, unsigned, BLOCK_8BIT, (1000,)).max() == x.abs().max()   # +1 is in the map


def test_4bit_codes_pack_two_to_a_byte_and_unpack():
    codes = torch.tensor([1, 15, 0, 7, 9], dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.tolist() == [1 | 15 << 4, 0 | 7 << 4, 9]
    assert torch.equal(unpack_4bit(packed, 5), codes)


def test_maps_and_codes_equal_torchao():
    qu = pytest.importorskip("torchao.optim.quant_utils", reason="torchao is not installed")
    assert dynamic_map(True).tolist() == qu.create_dynamic_map(signed=True)
    assert dynamic_map(False).tolist() == qu.create_dynamic_map(signed=False)
    assert dynamic_map(True, 4, 3).tolist() == qu.create_dynamic_map(True, 3, 4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4 * BLOCK_8BIT, generator=g)   # torchao needs whole blocks
    for signed in (True, False):
        y = x if signed else x.abs()
        qmap = dynamic_map(signed)
        normed, scale = qu.scale_tensor(y, BLOCK_8BIT)
        codes, scales = quantize(y, qmap, BLOCK_8BIT)
        assert torch.equal(scales, scale)
        assert torch.equal(codes, qu.quantize_8bit_with_qmap(normed, qmap))


def test_an_entry_halfway_between_two_map_values_takes_the_larger():
    qmap = quantization_map("dynamic", 8)
    halves = []
    for k in range(255):   # float32 midpoints that are exactly halfway (v - low == (high - low) / 2)
        low, high = qmap[k], qmap[k + 1]
        v = low + (high - low) * 0.5
        if v - low == (high - low) * 0.5 and low < v < high:
            halves.append((k, v.item()))
    assert len(halves) > 100
    x = torch.tensor([1.0] + [v for _, v in halves])   # absmax 1: the scale is exactly 1
    codes, scales = quantize(x, qmap, BLOCK_8BIT)
    assert scales.tolist() == [1.0]
    assert codes[1:].tolist() == [k + 1 for k, _ in halves]


def test_bytes_of_quantized_state_by_hand():
    # 8-bit: one byte per entry + 4 bytes per block of 256: 1 + 4/256 = 1.015625 B/entry
    assert quantized_nbytes(2 ** 20, 8, BLOCK_8BIT) == 2 ** 20 + 4 * 2 ** 12 == 1_064_960
    # 4-bit: half a byte per entry + 4 bytes per block of 128: 0.5 + 4/128 = 0.53125 B/entry
    assert quantized_nbytes(2 ** 20, 4, BLOCK_4BIT) == 2 ** 19 + 4 * 2 ** 13 == 557_056
    # a ragged last block has its own scale; an odd count of 4-bit codes takes a whole last byte
    assert quantized_nbytes(257, 8, BLOCK_8BIT) == 257 + 8
    assert quantized_nbytes(129, 4, BLOCK_4BIT) == 65 + 8
    # what quantize + pack_4bit actually store
    x = torch.randn(1001)
    for kind, bits, block in (("dynamic", 8, BLOCK_8BIT), ("dynamic", 4, BLOCK_4BIT)):
        codes, scales = quantize(x, quantization_map(kind, bits), block)
        stored = pack_4bit(codes) if bits == 4 else codes
        assert stored.nbytes + scales.nbytes == quantized_nbytes(1001, bits, block)


@pytest.mark.parametrize("kind, bits", [("dynamic", 8), ("dynamic-unsigned", 8), ("dynamic", 4), ("linear", 8),
                                        ("linear", 4)])
def test_table_lookup_finds_the_searched_code_at_every_switch_point(kind, bits):
    """The encoder's table (cells of floats, thresholds bisected once) against a search with the
    tie rule, on every map value, every midpoint and its float32 neighbours, and random values."""
    from lowmem.compress.optim.quant import _encoder
    qmap = quantization_map(kind, bits)
    mids = (qmap[:-1] + qmap[1:]) / 2
    x = torch.cat((qmap, mids, torch.nextafter(mids, torch.tensor(-2.0)), torch.nextafter(mids, torch.tensor(2.0)),
                   torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                   torch.logspace(-9, 0, 5_000), -torch.logspace(-9, 0, 5_000))).clamp(-1, 1)
    if kind == "dynamic-unsigned":
        x = x.abs()
    below = (torch.searchsorted(qmap, x, right=True) - 1).clamp(0, qmap.numel() - 1)
    above = (below + 1).clamp(max=qmap.numel() - 1)
    want = torch.where(x - qmap[below] >= (qmap[above] - qmap[below]) * 0.5, above, below)
    assert torch.equal(_encoder(qmap, x.device).nearest(x).long(), want)
