"""Optimizer-state memory implied by a plan (fp32 states, as torch AdamW keeps them).

AdamW keeps `m` and `v` for every parameter entry; a plan keeps full `m` and `v` reduced per
its `reduce` dims. The per-parameter ``step`` scalar (4 bytes) is left out of both.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem.compress.plan import Plan

STATE_BYTES = 4  # fp32


@dataclass(frozen=True)
class StateMemory:
    adamw_bytes: int
    plan_bytes: int

    @property
    def saved(self) -> float:
        """Share of AdamW's optimizer state the plan saves."""
        return 1 - self.plan_bytes / self.adamw_bytes if self.adamw_bytes else 0.0


def plan_state_memory(plan: Plan, bytes_per_entry: int = STATE_BYTES) -> StateMemory:
    """Bytes of `m` + `v` under AdamW and under `plan`."""
    full, kept = plan.v_full, plan.v_kept
    return StateMemory(2 * full * bytes_per_entry, (full + kept) * bytes_per_entry)


def format_bytes(n: int) -> str:
    """Binary units, labelled: ``12.3 MiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,} B"
