"""Data sets: the synthetic demo generator."""
