"""mmssm's ops: the aligned selective scan and the causal conv1d.

Both are ``torch.library`` custom ops (``torch.ops.mmssm.*``) with fake
implementations and FLOP formulas. The compiled extension ``mmssm._ext`` is
imported on the first call that needs it, not here.
"""

from .causal_conv1d import causal_conv1d
from .checks import GAP_MODES
from .ext import ext_status
from .flop_formulas import SCAN_CONVENTIONS, register_flop_formulas
from .reference import (
    align_to_dense,
    causal_conv1d_ref,
    masked_delta,
    selective_scan_chunked,
    selective_scan_ref,
)
from .selective_scan import selective_scan

register_flop_formulas()

__all__ = [
    'GAP_MODES',
    'SCAN_CONVENTIONS',
    'align_to_dense',
    'causal_conv1d',
    'causal_conv1d_ref',
    'ext_status',
    'masked_delta',
    'selective_scan',
    'selective_scan_chunked',
    'selective_scan_ref',
]
