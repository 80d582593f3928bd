"""The training stage: isolated deterministic training and held-out evaluation."""
