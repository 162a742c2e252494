"""Pieces of the training script that are worth testing on their own (config, dual path, mixup, runs)."""
