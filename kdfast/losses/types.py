"""Result types of the public losses (defined beside the kernels that build them)."""
from kdfast.functions.outputs import KDOutput

__all__ = ["KDOutput"]
