"""PyTorch -> JAX weight converters (python -m convert ...)."""
