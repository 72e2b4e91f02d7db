"""Files written whole or not at all.

Every file that mmssm writes (checkpoints, ``last_checkpoint``, dumped
results, label maps, converted weights, the synthetic sets' JSON, metrics)
goes through :func:`atomic_open`: the bytes go to a temporary file in the
same directory, which is flushed, ``fsync``-ed and ``os.replace``-d onto
the final path only when complete. A write that fails (no space left, a
killed process) leaves the old file, if any, as it was, and no partial
file behind.

mmengine writes checkpoints through a file backend (``backend_args`` of
the ``CheckpointHook``) and results through ``mmengine.dump``:
:class:`AtomicLocalBackend`, registered as ``'mmssm_atomic'``, is the local
backend that writes this way (``backend_args=dict(backend='mmssm_atomic')``).
"""

import contextlib
import errno
import os
import os.path as osp
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

from mmengine.fileio import LocalBackend, register_backend

ATOMIC_BACKEND = 'mmssm_atomic'
# backend_args that select the atomic local backend
ATOMIC_BACKEND_ARGS = dict(backend=ATOMIC_BACKEND)


@contextlib.contextmanager
def atomic_open(
    path: Union[str, Path], mode: str = 'wb', **kwargs
) -> Iterator[IO]:
    """Open ``path`` for writing; it appears only once complete.

    The file object writes to a temporary file beside ``path`` (same
    directory, so the rename is atomic); on a normal exit of the ``with``
    block it is flushed, synced to disk and renamed to ``path`` (replacing
    an existing file); on an exception it is removed and the exception
    goes on. The permissions are those of a file made by ``open``.

    Args:
        path (str | Path): The final path; its directory must exist.
        mode (str): 'wb' or 'w'. Defaults to 'wb'.
        **kwargs: More arguments of ``open`` (``encoding``, ``newline``).

    Yields:
        IO: The open temporary file.
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = osp.dirname(osp.abspath(path))
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix=f'.{osp.basename(path)}.', suffix='.tmp'
    )
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write(path: Union[str, Path], data: Union[bytes, str]) -> None:
    """Write ``data`` (bytes or text) to ``path`` with :func:`atomic_open`."""
    mode = 'wb' if isinstance(data, (bytes, bytearray, memoryview)) else 'w'
    with atomic_open(path, mode) as f:
        f.write(data)


def atomic_imwrite(path: Union[str, Path], image) -> None:
    """Encode ``image`` (uint8, BGR or gray, as OpenCV) in the format of
    ``path``'s extension and write it with :func:`atomic_open`."""
    import cv2

    ext = osp.splitext(os.fspath(path))[1] or '.png'
    ok, encoded = cv2.imencode(ext, image)
    if not ok:
        raise OSError(f'could not encode an image as {ext} for {path}')
    atomic_write(path, encoded.tobytes())


def atomic_savefig(path: Union[str, Path], fig, **kwargs) -> None:
    """``fig.savefig`` (matplotlib) with :func:`atomic_open`; the format
    is ``path``'s extension."""
    ext = osp.splitext(os.fspath(path))[1].lstrip('.') or 'png'
    with atomic_open(path, 'wb') as f:
        fig.savefig(f, format=ext, **kwargs)


def atomic_copy(src: Union[str, Path], dst: Union[str, Path]) -> None:
    """Copy the file ``src`` to ``dst`` with :func:`atomic_open`."""
    with open(src, 'rb') as fin, atomic_open(dst, 'wb') as fout:
        shutil.copyfileobj(fin, fout)


def describe_os_error(error: OSError) -> str:
    """The cause of a failed write in words (``no space left on device``)."""
    if error.errno is not None:
        name = {errno.ENOSPC: 'no space left on device'}.get(error.errno)
        return name or os.strerror(error.errno).lower()
    return str(error)


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing through :func:`atomic_open`.

    Selected by ``backend_args=dict(backend='mmssm_atomic')`` wherever
    mmengine takes backend arguments (``CheckpointHook``, ``dump``).
    Reading, listing and removing are those of ``LocalBackend``.
    """

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        """Write bytes to ``filepath`` (its directory is made if missing)."""
        os.makedirs(osp.dirname(osp.abspath(filepath)), exist_ok=True)
        atomic_write(filepath, obj)

    def put_text(
        self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8'
    ) -> None:
        """Write text to ``filepath`` (its directory is made if missing)."""
        self.put(obj.encode(encoding), filepath)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


class LockHeld(OSError):
    """Another live process holds the lock; its note is ``holder``."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f'{path} is held by {holder}')
        self.path = path
        self.holder = holder


@contextlib.contextmanager
def hold_lock(path: Union[str, Path], note: str) -> Iterator[None]:
    """Hold an advisory lock on ``path`` while the ``with`` block runs.

    ``fcntl.flock``: the kernel releases it when the process ends, however
    it ends, so a crashed holder leaves nothing behind. The file keeps the
    holder's ``note`` (e.g. its process id and command) for the message of
    the next one.

    Args:
        path (str | Path): The lock file (made if missing).
        note (str): Who holds it, written into the file.

    Raises:
        LockHeld: If another process holds it (with its note).
    """
    import fcntl

    path = os.fspath(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors='replace').strip()
            raise LockHeld(path, holder or 'another process') from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
