"""warp_dist: distributed WARP (Weight Averaged Rewarded Policies) for causal language models."""

__version__ = "0.1.0"
