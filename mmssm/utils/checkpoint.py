"""Safe loading of mmengine checkpoints under ``weights_only`` unpickling.

torch >= 2.6 loads checkpoints with ``weights_only=True``: only tensors,
containers and allow-listed globals are rebuilt, so a pickle that would call
``os.system`` is refused. mmengine's own training checkpoints also hold numpy
arrays and scalars (in ``meta`` and the message hub's ``HistoryBuffer``s);
we allow-list exactly those types and keep the safety on.

Also :func:`read_checkpoint` and :func:`check_checkpoint`, which every
entry point that reads a checkpoint uses, so that a file that is not a
checkpoint, is truncated or corrupt, or holds objects that are not tensors
and plain containers is refused with one line naming it (never with advice
to turn the safety off); :func:`load_checkpoint_strict`, mmengine's strict
loading with a one-line error; and :func:`sha256sum`, the digest that the
tools write of checkpoint files.
"""

import hashlib
import os.path as osp
import pickle
import re
import zipfile
from typing import Any, List, Optional

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


_GLOBAL = re.compile(r'GLOBAL (\S+)')


def _load_error(filename: str, error: Exception) -> UserError:
    """The one-line error of a failed ``torch.load(weights_only=True)``."""
    size = osp.getsize(filename)
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and 'GLOBAL' in text:
        found = _GLOBAL.search(text)
        name = found.group(1) if found else 'an unknown global'
        return UserError(
            f'checkpoint {filename!r} is refused: it holds objects that are '
            f'not tensors or plain containers ({name}); nothing in it was '
            'run. Load only checkpoints saved by mmengine or by the mmssm '
            'converters'
        )
    if zipfile.is_zipfile(filename) or _starts_like_zip(filename):
        return UserError(
            f'checkpoint {filename!r} is truncated or corrupt ({size} bytes; '
            f'{text.split(". ")[0][:100]})'
        )
    return UserError(
        f'checkpoint {filename!r} is not a PyTorch checkpoint ({size} '
        'bytes; neither a torch.save zip archive nor a pickle of tensors)'
    )


def _starts_like_zip(filename: str) -> bool:
    with open(filename, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'


def read_checkpoint(
    filename: str, map_location: Any = 'cpu', mmap: bool = False
) -> Any:
    """``torch.load`` of a local checkpoint, with one-line errors.

    Always ``weights_only=True`` (with the mmengine types of
    :func:`allow_mmengine_checkpoints`).

    Args:
        filename (str): A local file.
        map_location (Any): As for ``torch.load``. Defaults to 'cpu'.
        mmap (bool): Map the tensors' storage instead of reading it (the
            file must be a ``torch.save`` zip archive). Defaults to False.

    Returns:
        Any: What the file holds.

    Raises:
        UserError: If the file is missing or empty, is not a checkpoint,
            is truncated or corrupt (with its size), or holds objects that
            ``weights_only`` loading refuses (naming the first one).
    """
    if not osp.isfile(filename):
        raise UserError(f'checkpoint {filename!r} does not exist')
    if osp.getsize(filename) == 0:
        raise UserError(f'checkpoint {filename!r} is empty (0 bytes)')
    if mmap and not zipfile.is_zipfile(filename):
        mmap = False  # a legacy (pickle) file: read, and errors told below
    try:
        return torch.load(
            filename, map_location=map_location, weights_only=True, mmap=mmap
        )
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        KeyError,
        ValueError,
        IndexError,
        TypeError,
        AttributeError,
        ImportError,
        UnicodeDecodeError,
    ) as e:  # everything torch's unpickler raises on bad bytes
        raise _load_error(filename, e) from None


def check_checkpoint(filename: str, key: Optional[str] = None) -> None:
    """Check that a local checkpoint loads, before a long run reads it.

    The tensors are mapped, not read, so this costs little even for large
    files; a file whose end is missing fails here (a zip archive keeps its
    directory at the end). URLs are not checked.

    Args:
        filename (str): The checkpoint.
        key (str, optional): The config key or argument that names it,
            for the message (e.g. ``'load_from'``). Defaults to None.

    Raises:
        UserError: As :func:`read_checkpoint`, prefixed with ``key``.
    """
    if '://' in filename:
        return
    try:
        read_checkpoint(filename, mmap=True)
    except UserError as e:
        raise UserError(f'{key}: {e}' if key else str(e)) from None


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
        UserError: If the file is missing or bad (:func:`read_checkpoint`),
            or naming the missing and unexpected keys and the shape
            mismatches.
    """
    from mmengine.runner import load_checkpoint

    check_checkpoint(filename)
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
