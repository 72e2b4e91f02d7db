"""Safe loading of mmengine checkpoints under ``weights_only`` unpickling.

torch >= 2.6 loads checkpoints with ``weights_only=True``: only tensors,
containers and allow-listed globals are rebuilt, so a pickle that would call
``os.system`` is refused. mmengine's own training checkpoints also hold numpy
arrays and scalars (in ``meta`` and the message hub's ``HistoryBuffer``s);
we allow-list exactly those types and keep the safety on.
"""
import numpy as np
import torch


def _numpy_globals() -> list:
    core = np._core if hasattr(np, '_core') else np.core  # numpy 2 / 1
    dtypes = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
              np.uint16, np.uint32, np.uint64, np.float16, np.float32,
              np.float64)
    return [
        core.multiarray._reconstruct,  # numpy arrays
        core.multiarray.scalar,  # numpy scalars
        np.ndarray,
        np.dtype,
        *(type(np.dtype(t)) for t in dtypes),  # numpy 2's dtype classes
    ]


def mmengine_safe_globals() -> list:
    """The globals that mmengine's training checkpoints need, and no more."""
    from mmengine.logging.history_buffer import HistoryBuffer
    return _numpy_globals() + [HistoryBuffer]


def allow_mmengine_checkpoints() -> None:
    """Allow-list :func:`mmengine_safe_globals` for ``torch.load``.

    ``weights_only`` loading stays on: a checkpoint that needs any other
    global is still refused by torch with an ``UnpicklingError`` that names
    the global, and nothing in it runs.
    """
    torch.serialization.add_safe_globals(mmengine_safe_globals())
