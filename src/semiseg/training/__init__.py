"""Training: one engine for every method (config variants), checkpoints and resume."""
