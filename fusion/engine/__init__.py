"""Training engine: one loop for every family, checkpoints, local and Ray Train runners."""
