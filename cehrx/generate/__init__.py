"""Synthetic patient generation: the sampling engine (`sampler`) and what turns samples into data."""
