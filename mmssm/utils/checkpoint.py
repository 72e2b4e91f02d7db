"""Safe loading of mmengine checkpoints under ``weights_only`` unpickling.

torch >= 2.6 loads checkpoints with ``weights_only=True``: only tensors,
containers and allow-listed globals are rebuilt, so a pickle that would call
``os.system`` is refused. mmengine's own training checkpoints also hold numpy
arrays and scalars (in ``meta`` and the message hub's ``HistoryBuffer``s);
we allow-list exactly those types and keep the safety on.

Also :func:`load_checkpoint_strict`, mmengine's strict loading with a
one-line error, and :func:`sha256sum`, the digest that the tools write of
checkpoint files.
"""

import hashlib
import os.path as osp
import pickle
from typing import List

import numpy as np
import torch

from mmssm.errors import UserError


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


def _listing(keys: List[str], limit: int = 8) -> str:
    more = f', ... ({len(keys)} in all)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


# the lines of mmengine's load_state_dict error -> our names
_KEY_LINES = {
    'missing keys in source state_dict: ': 'missing keys',
    'unexpected key in source state_dict: ': 'unexpected keys',
}


def _mismatch(filename: str, error: str) -> str:
    """One line from the error of mmengine's strict ``load_state_dict``."""
    parts, shapes = [], []
    for line in map(str.strip, error.splitlines()):
        for prefix, name in _KEY_LINES.items():
            if line.startswith(prefix):
                keys = line[len(prefix) :].split(', ')
                parts.append(f'{name}: {_listing(keys)}')
        if line.startswith('size mismatch for '):
            shapes.append(line.rstrip('.'))
    if shapes:
        parts.append(_listing(shapes, limit=4))
    return (
        f'checkpoint {filename!r} does not match the model of the config '
        '(is it for another backbone or arch?); ' + '; '.join(sorted(parts))
    )


def load_checkpoint_strict(model: torch.nn.Module, filename: str) -> dict:
    """Load a checkpoint that must hold exactly the weights of ``model``.

    mmengine's ``load_checkpoint(strict=True)``, on the CPU, with the
    ``module.`` prefix of wrapped models removed. The model's load hooks
    run (a ``pos_embed`` of another grid is resized, as when the Runner
    loads it). A checkpoint of another backbone or arch is refused instead
    of being loaded with a warning and run with random weights.

    Args:
        model (nn.Module): The model (model wrappers are unwrapped).
        filename (str): A local path or any URL mmengine can load.

    Returns:
        dict: The loaded checkpoint.

    Raises:
        UserError: If the file is missing, or naming the missing and
            unexpected keys and the shape mismatches.
    """
    from mmengine.runner import load_checkpoint

    if '://' not in filename and not osp.isfile(filename):
        raise UserError(f'checkpoint {filename!r} does not exist')
    try:
        return load_checkpoint(
            model,
            filename,
            map_location='cpu',
            strict=True,
            revise_keys=[(r'^module\.', '')],
        )
    except RuntimeError as e:
        if 'do not match exactly' not in str(e):
            raise
        raise UserError(_mismatch(filename, str(e))) from None
