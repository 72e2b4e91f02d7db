"""mmssm: token-pruned vision state-space models for OpenMMLab."""

from .utils.checkpoint import allow_mmengine_checkpoints
from .version import __version__

# torch >= 2.6 unpickles checkpoints with ``weights_only=True``; allow-list the
# few plain types that mmengine's own checkpoints hold so that they load.
allow_mmengine_checkpoints()

__all__ = ['__version__']
