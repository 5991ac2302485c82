"""unmask: diffusion language models — train, decode fast, edit in place, serve."""

from unmask.pipeline import Pipeline, load

__all__ = ["Pipeline", "load"]
__version__ = "0.1.0"
