from .causal_conv1d import causal_conv1d, causal_conv1d_ref
from .selective_scan import (
    ScanCall,
    align_to_dense,
    ext_status,
    scan_listener,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)

__all__ = [
    'causal_conv1d',
    'causal_conv1d_ref',
    'selective_scan',
    'selective_scan_ref',
    'selective_scan_chunked',
    'align_to_dense',
    'ext_status',
    'scan_listener',
    'ScanCall',
]
