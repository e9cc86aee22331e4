"""Evaluation of frozen encoders: weighted kNN and the linear probe."""
