"""lowmem: how much of Adam's second moment can this model do without?

Watch a training run, measure per layer and per axis how well Adam's `v` is replaced by its mean
(SNR), write a per-layer compression plan, and build the low-memory optimizer it describes.
"""

from lowmem.compress import Plan, build_plan, build_preset, slimadam_rules
from lowmem.compress.formats import StateFormat
from lowmem.compress.optim import AdafactorMomentum, AdaLayer, AdaMeM, AdamMini, Eve, ReducedAdamW, SlimAdam, optimizer_from_plan
from lowmem.hessian import block_hessian
from lowmem.layers import ParamInfo, resolve_layers
from lowmem.snr import SnrCapture, SnrTrajectory, capture, estimate_snr

__version__ = "0.1.0"

__all__ = ["AdaLayer", "AdaMeM", "AdafactorMomentum", "AdamMini", "Eve", "ParamInfo", "Plan", "ReducedAdamW", "SlimAdam", "SnrCapture",
           "SnrTrajectory", "StateFormat", "block_hessian", "build_plan", "build_preset", "capture", "estimate_snr", "optimizer_from_plan",
           "resolve_layers", "slimadam_rules", "__version__"]
