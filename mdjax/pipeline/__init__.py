"""Algorithm 1 of the paper as resumable stages: train, validate, GANs, generate, fine-tune, test."""
