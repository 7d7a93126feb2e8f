"""The thin trainer: the training step, clock, checkpoints, pretrain loop and the comparison."""
