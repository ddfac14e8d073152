"""xpar: Mixture-of-Experts Transformer training across many GPUs and nodes."""

__version__ = "0.1.0"
