"""SNR of Adam's second moment: the estimator, views of a parameter, capture, trajectories."""

from lowmem.snr.capture import NoAdamStateError, SnrCapture, capture
from lowmem.snr.estimator import SnrValue, axis_subsets, estimate_snr, snr_terms
from lowmem.snr.keys import SnrKey, ViewLabel
from lowmem.snr.trajectory import HEADER, Sample, SnrTrajectory, TrajectoryError, TrajectoryWriter, read_trajectory
from lowmem.snr.views import View, describe_subset, param_views

__all__ = ["HEADER", "NoAdamStateError", "Sample", "SnrCapture", "SnrKey", "SnrTrajectory", "SnrValue",
           "TrajectoryError", "TrajectoryWriter", "View", "ViewLabel", "axis_subsets", "capture",
           "describe_subset", "estimate_snr", "param_views", "read_trajectory", "snr_terms"]
