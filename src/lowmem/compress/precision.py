"""Storage formats of a layer's optimizer state chosen from measured precision, and the bytes
they take.

Per layer (`choose_state`): `m` takes the smallest format (by bytes: int4 < int8 < bf16 < fp32)
whose update-direction error (`lowmem.snr.precision`) stays strictly below the threshold at every
measurement in the window; the same for `v` when the layer keeps `v` whole (full Adam). A layer
whose `v` is averaged keeps its few `v` entries in fp32; a layer without a measurement keeps fp32
state. No layer is special-cased by name or role: embeddings are measured like any other layer.

`PRECISION_THRESHOLD`, the default, is 5% relative error in the update direction. On the
built-in example (``lowmem-analyze --example shakespeare``: 400 steps at lr 1e-3, a measurement
every 10 steps) the largest error over the run, per layer, ranges over:

======  =======================  =======================
format  m: update error          v: update error
======  =======================  =======================
bf16    0.17% – 0.21%            0.08% – 0.11%
int8    1.4% – 2.0%              0.56% – 1.4%
int4    19% – 24%                (not offered)
======  =======================  =======================

(the first measurements are the worst for the quantized formats; no layer's int4 `m` error falls
below 13% at any measurement; the token embedding has the smallest int8 errors of all layers, so
it needs no exception here). 5% passes 8-bit state everywhere with a margin of 2.5 and refuses
4-bit `m` with a margin of 2.6 or more. That follows the literature: Dettmers, Lewis, Shleifer,
Zettlemoyer, "8-bit Optimizers via Block-wise Quantization" (2022) found block-wise quantization
with the dynamic map to keep 8-bit Adam at 32-bit quality (with a stable embedding layer); Li,
Chen, Zhu, "Memory Efficient Optimizers with 4-bit States" (2023) needed more than plain
block-wise absmax for 4 bits (blocks of 128 for `m`, another normalisation and a zero-free map for
`v`). Training the example 400 steps with its state stored in a format after every step (one seed)
ended at held-out loss 2.449 in fp32, 2.448 with int8 `m`, 2.445 with int8 `v` and 2.437 with int4
`m`: no format hurt this short run, so the margin is on the safe side; a larger threshold lets
4-bit `m` in, and ``--validate`` checks the result on the model at hand. A threshold of 0 keeps
every state in fp32 (formats off).
"""

from __future__ import annotations

from lowmem.compress.formats import M_FORMATS, V_FORMATS, StateFormat, effective_format, stored_bytes
from lowmem.compress.plan import LayerPlan, Plan
from lowmem.snr.precision import WorstError

PRECISION_THRESHOLD = 0.05
ADAMW_BYTES_PER_PARAMETER = 8   # fp32 m and v


def v_whole(lp: LayerPlan) -> bool:
    """Whether the layer keeps its `v` whole (full Adam, also every part of a fused layer)."""
    return lp.v_kept == lp.numel


def _by_bytes(formats, shape) -> list[str]:
    return sorted(formats, key=lambda f: (stored_bytes(f, shape), formats.index(f)))


def choose_state(lp: LayerPlan, worst: dict[tuple[str, str], WorstError],
                 threshold: float = PRECISION_THRESHOLD) -> tuple[StateFormat, str]:
    """The state format of one layer and why (see the module docstring).

    Args:
        lp: the layer's plan (its shape, and whether its `v` is kept whole).
        worst: ``{(state, format): WorstError}`` of this layer over the window.
        threshold: a format passes when its largest update error is strictly below this.

    Returns:
        (format, the words for the layer's ``why``).
    """
    shape, whole = tuple(lp.shape), v_whole(lp)
    picks, words = {}, []
    for which, formats in (("m", M_FORMATS), ("v", V_FORMATS)):
        if which == "v" and not whole:
            picks[which] = "fp32"
            words.append("v fp32 (averaged)")
            continue
        usable = [f for f in formats if f != "fp32" and
                  getattr(effective_format(StateFormat(**{which: f}), shape, whole), which) == f]
        chosen, failed = "fp32", None
        for fmt in _by_bytes(usable, shape):
            w = worst.get((which, fmt))
            if w is None:
                continue
            if w.update_error < threshold:
                chosen = fmt
                break
            failed = (fmt, w.update_error)
        picks[which] = chosen
        if chosen != "fp32":
            text = f"{which} {chosen} (update error {_pct(worst[(which, chosen)].update_error)} < {_pct(threshold)}"
            text += f"; {failed[0]} {_pct(failed[1])})" if failed else ")"
        elif failed:
            text = f"{which} fp32 ({failed[0]} update error {_pct(failed[1])} ≥ {_pct(threshold)})"
        else:
            text = f"{which} fp32 (no precision measurement)"
        words.append(text)
    return StateFormat(picks["m"], picks["v"]), "state " + ", ".join(words)


def _pct(x: float) -> str:
    return f"{x:.2%}" if x < 0.1 else f"{x:.1%}"


def layer_state_bytes(lp: LayerPlan, compute_bytes: int = 4) -> int:
    """Bytes of a layer's `m` (over its shape) and kept `v` (over the kept entries) in its plan's
    formats, where they apply (`effective_format`; fp32 is `compute_bytes` per entry)."""
    whole = v_whole(lp)
    fmt = effective_format(lp.state_format, tuple(lp.shape), whole)
    m = stored_bytes(fmt.m, lp.shape, compute_bytes)
    v = stored_bytes(fmt.v, lp.shape, compute_bytes) if whole else lp.v_kept * compute_bytes
    return m + v


def plan_bytes_per_parameter(plan: Plan, compute_bytes: int = 4) -> float:
    """Bytes of optimizer state (m and kept v, in the plan's formats) per parameter entry;
    AdamW keeps `ADAMW_BYTES_PER_PARAMETER`."""
    n = plan.v_full
    return sum(layer_state_bytes(lp, compute_bytes) for lp in plan.layers.values()) / n if n else 0.0


__all__ = ["ADAMW_BYTES_PER_PARAMETER", "PRECISION_THRESHOLD", "choose_state", "layer_state_bytes",
           "plan_bytes_per_parameter", "v_whole"]
