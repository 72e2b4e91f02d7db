"""Safe loading of mmengine checkpoints under ``weights_only`` unpickling.

torch >= 2.6 loads checkpoints with ``weights_only=True``: only tensors,
containers and allow-listed globals are rebuilt, so a pickle that would call
``os.system`` is refused. mmengine's own training checkpoints also hold numpy
arrays and scalars (in ``meta`` and the message hub's ``HistoryBuffer``s);
we allow-list exactly those types and keep the safety on.

Also :func:`sha256sum`, the digest that the tools write of checkpoint files.
"""

import hashlib
import pickle

import numpy as np
import torch


def _numpy_globals() -> list:
    core = np._core if hasattr(np, '_core') else np.core  # numpy 2 / 1
    dtypes = (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    )
    return [
        core.multiarray._reconstruct,  # numpy arrays
        core.multiarray.scalar,  # numpy scalars
        np.ndarray,
        np.dtype,
        *(type(np.dtype(t)) for t in dtypes),  # numpy 2's dtype classes
    ]


def _history_buffer_method(owner, name: str):
    """Stands in for ``getattr`` while unpickling: HistoryBuffer's methods.

    A pickled ``HistoryBuffer`` names its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``. Allowing the real ``getattr`` would
    let a checkpoint reach any attribute of any allowed object, so only the
    methods that HistoryBuffer registers itself are served.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    if owner is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({owner!r}, {name!r}); only '
        f'HistoryBuffer.{{{", ".join(_HISTORY_BUFFER_METHODS)}}} are allowed'
    )


_HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')


def mmengine_safe_globals() -> list:
    """The globals that mmengine's training checkpoints need, and no more."""
    from mmengine.logging.history_buffer import HistoryBuffer

    return _numpy_globals() + [
        HistoryBuffer,
        (_history_buffer_method, 'builtins.getattr'),
    ]


def allow_mmengine_checkpoints() -> None:
    """Allow-list :func:`mmengine_safe_globals` for ``torch.load``.

    ``weights_only`` loading stays on: a checkpoint that needs any other
    global is still refused by torch with an ``UnpicklingError`` that names
    the global, and nothing in it runs.
    """
    torch.serialization.add_safe_globals(mmengine_safe_globals())


def sha256sum(path: str) -> str:
    """The SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
