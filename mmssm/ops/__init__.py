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
    'selective_scan',
    'selective_scan_ref',
    'selective_scan_chunked',
    'align_to_dense',
    'ext_status',
    'scan_listener',
    'ScanCall',
]
