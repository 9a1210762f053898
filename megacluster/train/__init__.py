"""Training: the worker loop, balancing, checkpoints, supervisor, fault injection."""
