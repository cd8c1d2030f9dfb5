"""Datasets (registry, sources) and the grain input pipeline."""
