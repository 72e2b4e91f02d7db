from .base_backbone import SSMBackbone
from .plainmamba import PlainMamba
from .vim import Vim

__all__ = ['SSMBackbone', 'PlainMamba', 'Vim']
