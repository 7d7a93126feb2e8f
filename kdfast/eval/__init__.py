"""Evaluation: GLUE fine-tuning and metrics, and the comparison report."""
