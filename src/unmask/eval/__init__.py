"""Evaluation: likelihood bounds in bits per byte (elbo.py) and task evaluations added by their issues."""
