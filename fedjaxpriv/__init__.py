"""fedjaxpriv: vectorized federated learning simulation in JAX for privacy research."""

__version__ = "0.1.0"
