"""Write a generated data set into a folder whole, or not at all.

The generators build a set in a temporary folder beside its destination
and rename it into place when complete, with a ``meta.json`` (the
parameters it was made with) written last; an existing folder with the
same meta is kept as it is.
"""

import json
import os
import os.path as osp
import shutil
import tempfile
from typing import Callable, Optional, Sequence

from mmssm.utils.fileio import atomic_write


def dump_json(obj, path: str) -> None:
    """Write ``obj`` as compact JSON with a final newline, whole or not."""
    atomic_write(path, json.dumps(obj, separators=(',', ':')) + '\n')


def read_set_meta(out_dir: str, files: Sequence[str] = ()) -> Optional[dict]:
    """The ``meta.json`` of a complete set in ``out_dir``, or None.

    Args:
        out_dir (str): The set's folder.
        files (Sequence[str]): Files (relative) a complete set also has.

    Returns:
        dict | None: None if a file is missing or the meta is unreadable.
    """
    needed = ['meta.json', *files]
    if not all(osp.isfile(osp.join(out_dir, f)) for f in needed):
        return None
    try:
        with open(osp.join(out_dir, 'meta.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_set(
    out_dir: str,
    meta: dict,
    build: Callable[[str], None],
    overwrite: bool = False,
    files: Sequence[str] = (),
) -> bool:
    """Build a set with ``build(tmp_dir)`` and move it to ``out_dir``.

    Args:
        out_dir (str): Where the set goes.
        meta (dict): Its parameters, written last as ``meta.json``.
        build (Callable): Writes the set's files into the folder it gets.
        overwrite (bool): Replace a set made with other parameters instead
            of raising. Defaults to False.
        files (Sequence[str]): Files a complete set has (see
            :func:`read_set_meta`). Defaults to ().

    Returns:
        bool: True if a set was written, False if ``out_dir`` already held
        this set.

    Raises:
        FileExistsError: ``out_dir`` exists and is not this set (and
            ``overwrite`` is False).
    """
    out_dir = osp.abspath(out_dir)
    if osp.exists(out_dir):
        if read_set_meta(out_dir, files) == meta:
            return False
        if not overwrite:
            raise FileExistsError(
                f'{out_dir} exists and is not the synthetic set of these '
                f'parameters ({meta}); remove it or pass overwrite=True'
            )
    parent = osp.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(
        prefix=f'.{osp.basename(out_dir)}.partial-', dir=parent
    )
    try:
        build(tmp)
        dump_json(meta, osp.join(tmp, 'meta.json'))  # last: the set is whole
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        old = None
        if osp.exists(out_dir):  # overwrite: move the old set aside first
            old = tempfile.mkdtemp(
                prefix=f'.{osp.basename(out_dir)}.old-', dir=parent
            )
            os.rename(out_dir, osp.join(old, 'set'))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if old is not None and not osp.exists(out_dir):
                os.rename(osp.join(old, 'set'), out_dir)  # put it back
                shutil.rmtree(old, ignore_errors=True)
                raise
            # another process finished the same set first: keep it
            if read_set_meta(out_dir, files) != meta:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True
