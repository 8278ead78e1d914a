"""Runnable examples: `python -m ssm_kernels.examples.recall`."""
