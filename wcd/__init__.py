"""wcd: a warm worker controller for vLLM."""

__version__ = "0.1.0"
