"""kdfast: fused knowledge-distillation losses and an equal-compute KD-vs-scratch engine."""
from kdfast import _backends
from kdfast._buffers import release_workspaces
from kdfast.losses import *  # noqa: F401,F403
from kdfast.losses import __all__ as _loss_names

_backends.preload()  # op modules imported now, not while torch.compile traces a loss

__version__ = "0.1.0"
__all__ = [*_loss_names, "release_workspaces"]
