"""Training: the WARP run loop (`loop.Warp`) and its parts: what a rank holds (`session`), the RL phase (`rl_step`,
`rl`), the merge (`merger`), the run state and checkpoints (`state`), the run folder (`output`), and the models a rank
holds under DDP or DeepSpeed (`policy`)."""
