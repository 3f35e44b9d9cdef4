"""Evaluation and logging callbacks."""
