from .plainmamba import PlainMamba
from .vim import Vim

__all__ = ['PlainMamba', 'Vim']
