"""Compression plans, their builders and the memory they imply."""

from lowmem.compress.builders import PRESETS, build_plan, build_preset, slimadam_rules
from lowmem.compress.configs import CONFIGS, build_config_model
from lowmem.compress.memory import (MemoryEstimate, StateBytes, StateMemory, estimate_state_memory, format_bytes,
                                    optimizer_state_bytes, plan_state_memory)
from lowmem.compress.plan import (SCHEMA, LayerPlan, PartPlan, Plan, PlanError, PlanMismatchError,
                                  model_fingerprint, model_record)

__all__ = ["CONFIGS", "PRESETS", "SCHEMA", "LayerPlan", "MemoryEstimate", "PartPlan", "Plan", "PlanError",
           "PlanMismatchError", "StateBytes", "StateMemory", "build_config_model", "build_plan", "build_preset",
           "estimate_state_memory", "format_bytes", "model_fingerprint", "model_record", "optimizer_state_bytes",
           "plan_state_memory", "slimadam_rules"]
