"""Exact block Hessians, their structure, partitions derived from curvature, and plans from them
(DESIGN §6); stochastic estimates through Hessian-vector products for blocks too large to form.

- `exact`: `block_hessian(model, loss_fn, batches, name, other=None, dtype=None)`, `piece`
  (block selectors), `HessianOperator` (V ↦ H V for the estimates).
- `structure`: partitions, in-partition mass against the dense baseline, Class 1 / Class 2,
  a partition found without being told the heads, spectra.
- `plans`: a plan whose blocks are the found partitions.
- `estimates`: Hutchinson diagonal, Lanczos extreme eigenvalues and spectral density, Frobenius
  masses of sub-blocks and cross blocks from random probes (each with its sample count and error).
"""

from lowmem.hessian.estimates import (cross_block_mass, extreme_eigenvalues, frobenius_mass, hutchinson_diagonal,
                                      hutchinson_trace, lanczos, spectral_density)
from lowmem.hessian.estimates import partition_mass as estimate_partition_mass
from lowmem.hessian.exact import (DisconnectedError, HessianError, HessianOperator, HessianTooLarge, LossFnError, Piece,
                                  RandomForwardError, block_hessian, piece)
from lowmem.hessian.plans import plan_from_partitions
from lowmem.hessian.structure import (Classification, Partition, block_spectrum, candidate_partitions, classify,
                                      find_partition, partition_mass)

__all__ = ["Classification", "DisconnectedError", "HessianError", "HessianOperator", "HessianTooLarge", "LossFnError",
           "Partition", "Piece", "RandomForwardError", "block_hessian", "block_spectrum", "candidate_partitions", "classify",
           "cross_block_mass", "estimate_partition_mass", "extreme_eigenvalues", "find_partition",
           "frobenius_mass", "hutchinson_diagonal", "hutchinson_trace", "lanczos", "partition_mass", "piece",
           "plan_from_partitions", "spectral_density"]
