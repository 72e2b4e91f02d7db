"""The compiled extension, loaded on first use of a kernel.

The kernels are built twice (setup.py): ``mmssm._ext`` for any x86-64 and
``mmssm._ext_avx2`` for CPUs with AVX2 + FMA; :func:`load_ext` loads the one
this CPU runs best (``MMSSM_KERNEL_ISA`` forces one). ``import mmssm.ops``
does not import either: :func:`load_ext` does, once, when an op first needs
to know whether its kernel is there. A missing or broken extension is not
an error here; the ops fall back to PyTorch and say why (:func:`ext_status`,
:func:`warn_once`). An unknown ``MMSSM_KERNEL_ISA``, or 'avx2' on a CPU
without it, is an error.
"""

import importlib
import os
import warnings
from typing import Set

import torch
from torch import Tensor

from mmssm.errors import UserError

# Sentinel: the import has not been tried yet.
_NOT_LOADED = object()
_ext = _NOT_LOADED
_error = ''
_isa = ''
_warned: Set[str] = set()

#: The instruction sets the kernels are built for.
ISAS = ('generic', 'avx2')


def cpu_has_avx2() -> bool:
    """Whether this CPU runs AVX2 + FMA code (as PyTorch detects it)."""
    return torch.backends.cpu.get_cpu_capability() in ('AVX2', 'AVX512')


def _chosen_isa() -> str:
    """The build to load: ``MMSSM_KERNEL_ISA`` ('generic' or 'avx2'),
    otherwise 'avx2' when the CPU has it."""
    isa = os.environ.get('MMSSM_KERNEL_ISA', '')
    if isa and isa not in ISAS:
        raise UserError(
            f'MMSSM_KERNEL_ISA must be one of {ISAS} (or unset), got {isa!r}'
        )
    if isa == 'avx2' and not cpu_has_avx2():
        raise UserError(
            'MMSSM_KERNEL_ISA=avx2, but this CPU has no AVX2 '
            f'(torch: {torch.backends.cpu.get_cpu_capability()})'
        )
    return isa or ('avx2' if cpu_has_avx2() else 'generic')


def import_isa(isa: str):
    """The build of the kernels for ``isa`` ('generic': ``mmssm._ext``,
    'avx2': ``mmssm._ext_avx2``), imported.

    Raises:
        ImportError | OSError: If it is not built or broken.
    """
    name = 'mmssm._ext' if isa == 'generic' else f'mmssm._ext_{isa}'
    return importlib.import_module(name)


def load_ext():
    """The compiled kernels, imported on the first call; None if they
    cannot be.

    Two builds of the same kernels exist (setup.py): generic x86-64
    (``mmssm._ext``) and AVX2 + FMA (``mmssm._ext_avx2``). The AVX2 one is
    loaded when the CPU has AVX2 and ``MMSSM_KERNEL_ISA`` does not say
    'generic'. When it was chosen automatically, a missing AVX2 build (an
    old build) falls back to the generic one with a warning; when forced,
    it does not.

    Returns:
        module | None: The extension, or None (the reason is in
        :func:`ext_status`).
    """
    global _ext, _error, _isa
    if _ext is _NOT_LOADED:
        isa = _chosen_isa()
        try:
            _ext, _isa = import_isa(isa), isa
        except (ImportError, OSError) as e:  # OSError: a broken .so
            _ext, _error = None, f'{type(e).__name__}: {e}'
        forced = bool(os.environ.get('MMSSM_KERNEL_ISA'))
        if _ext is None and isa != 'generic' and not forced:
            try:
                _ext, _isa = import_isa('generic'), 'generic'
                warn_once(
                    f'the {isa} build of the mmssm kernels cannot be loaded '
                    f'({_error}); using the generic build (slower). '
                    'Rebuild: python setup.py build_ext --inplace'
                )
            except (ImportError, OSError) as e:
                _error = f'{type(e).__name__}: {e}'
    return _ext


def loaded_isa() -> str:
    """The instruction set of the loaded kernels ('generic' or 'avx2'), or
    '' when none is loaded."""
    return _isa if load_ext() is not None else ''


def ext_status() -> str:
    """Whether the compiled CPU kernels are available, and why not.

    Returns:
        str: 'built', or 'not built (<the import error>)' (the build that
        is loaded: :func:`loaded_isa`).
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
