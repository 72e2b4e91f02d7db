"""The compiled extension ``mmssm._ext``, loaded on first use of a kernel.

``import mmssm.ops`` does not import it: :func:`load_ext` does, once, when
an op first needs to know whether its kernel is there. A missing or broken
extension is not an error here; the ops fall back to PyTorch and say why
(:func:`ext_status`, :func:`warn_once`).
"""

import importlib
import warnings
from typing import Set

from torch import Tensor

# Sentinel: the import has not been tried yet.
_NOT_LOADED = object()
_ext = _NOT_LOADED
_error = ''
_warned: Set[str] = set()


def load_ext():
    """``mmssm._ext``, imported on the first call; None if it cannot be.

    Returns:
        module | None: The extension, or None (the reason is in
        :func:`ext_status`).
    """
    global _ext, _error
    if _ext is _NOT_LOADED:
        try:
            _ext = importlib.import_module('mmssm._ext')
        except (ImportError, OSError) as e:  # OSError: a broken .so
            _ext, _error = None, f'{type(e).__name__}: {e}'
    return _ext


def ext_status() -> str:
    """Whether the compiled CPU kernels are available, and why not.

    Returns:
        str: 'built', or 'not built (<the import error>)'.
    """
    if load_ext() is None:
        return f'not built ({_error})'
    return 'built'


def cpu_kernel_skip_reason(x: Tensor, entry: str, name: str) -> str:
    """Why the compiled kernel cannot run on ``x``; '' if it can.

    Args:
        x (Tensor): The op's first input (for its device).
        entry (str): The extension's function that the op calls (a build
            of an older checkout may lack it).
        name (str): The kernel's name in the messages.

    Returns:
        str: The reason, for warnings and errors.
    """
    ext = load_ext()
    if ext is None:
        return f'the compiled kernel mmssm._ext is missing ({_error})'
    if x.device.type != 'cpu':
        return f'the compiled kernel runs on the CPU, not {x.device.type}'
    if not hasattr(ext, entry):
        return f'mmssm._ext was built without the {name} kernel (rebuild it)'
    return ''


def warn_once(msg: str) -> None:
    """Warn with ``msg`` the first time only (per process)."""
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=4)
