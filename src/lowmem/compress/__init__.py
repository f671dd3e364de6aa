"""Compression plans, their builders and the memory they imply."""

from lowmem.compress.builders import PRESETS, build_plan, build_preset, slimadam_rules
from lowmem.compress.memory import StateMemory, format_bytes, plan_state_memory
from lowmem.compress.plan import (SCHEMA, LayerPlan, PartPlan, Plan, PlanError, PlanMismatchError,
                                  model_fingerprint, model_record)

__all__ = ["PRESETS", "SCHEMA", "LayerPlan", "PartPlan", "Plan", "PlanError", "PlanMismatchError",
           "StateMemory", "build_plan", "build_preset", "format_bytes", "model_fingerprint",
           "model_record", "plan_state_memory", "slimadam_rules"]
