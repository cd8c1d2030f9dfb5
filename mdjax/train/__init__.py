"""Classifier training: pure jitted steps (`steps`) and the resumable loop (`classifier`)."""
