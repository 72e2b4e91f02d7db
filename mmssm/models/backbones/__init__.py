from .base_backbone import SSMBackbone
from .plainmamba import PlainMamba
from .vim import Vim
from .vit_adapter import ViTAdapter

__all__ = ['SSMBackbone', 'PlainMamba', 'Vim', 'ViTAdapter']
