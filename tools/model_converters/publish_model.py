"""Turn a training checkpoint into a model-zoo checkpoint.

Only ``meta`` (config text, ``dataset_meta``, the pruning schedule of
``mmssm.PruningMetaHook``, seed, time...) and ``state_dict`` are kept; the
optimizer, the message hub and the scheduler states are dropped. The file
is named ``<config>_<YYYYMMDD_HHMMSS>-<sha256[:8]>.pth``, as OpenMMLab's
model zoos: the config name and the time stamp come from the checkpoint's
``meta['experiment_name']`` (mmengine writes ``<config>_<time stamp of the
run>``, the stamp of the run's log directory), and the last part is the
first 8 hex digits of the SHA-256 of the written file. An existing file is
never overwritten, and the file is written whole or not at all
(:mod:`mmssm.utils.fileio`), so a failed run leaves no partial checkpoint
behind.

Example::

    python tools/model_converters/publish_model.py \\
        work_dirs/<config>/epoch_12.pth checkpoints/
    # -> checkpoints/<config>_20250101_120000-1a2b3c4d.pth
"""

import argparse
import hashlib
import io
import os
import os.path as osp
import re
import time
from typing import List, Optional, Tuple

import torch

import mmssm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from mmssm.errors import UserError
from mmssm.utils.checkpoint import read_checkpoint
from mmssm.utils.cli import exit_on_user_error
from mmssm.utils.fileio import atomic_write

KEEP_KEYS = ('meta', 'state_dict')
STAMP = re.compile(r'^(?P<name>.+)_(?P<stamp>\d{8}_\d{6})$')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('in_file', help='the training checkpoint (.pth)')
    parser.add_argument(
        'out_dir',
        nargs='?',
        default='.',
        help='folder of the published file. Defaults to the current one.',
    )
    parser.add_argument(
        '--config',
        help='config name (or path) for the file name, if the checkpoint '
        "has no meta['experiment_name'] or another name is wanted",
    )
    parser.add_argument(
        '--timestamp',
        help='YYYYMMDD_HHMMSS for the file name; defaults to the stamp of '
        "meta['experiment_name'], else meta['time'], else now",
    )
    return parser.parse_args(argv)


def file_stem(
    meta: dict, config: Optional[str] = None, timestamp: Optional[str] = None
) -> str:
    """``<config>_<YYYYMMDD_HHMMSS>`` of the published file.

    Args:
        meta (dict): The checkpoint's meta.
        config (str, optional): Config name or path; overrides the name in
            ``meta['experiment_name']``. Defaults to None.
        timestamp (str, optional): ``YYYYMMDD_HHMMSS``; overrides the
            stamp of ``meta['experiment_name']`` (then ``meta['time']``,
            then the current time). Defaults to None.

    Returns:
        str: The file name without the hash and the extension.

    Raises:
        UserError: If there is no config name or a stamp is malformed.
    """
    name = stamp = None
    match = STAMP.match(str(meta.get('experiment_name') or ''))
    if match:
        name, stamp = match['name'], match['stamp']
    if config:
        name = osp.splitext(osp.basename(config.rstrip('/')))[0]
    if not name:
        raise UserError(
            "the checkpoint has no meta['experiment_name'] of the form "
            '<config>_<YYYYMMDD_HHMMSS> (was it saved by mmengine?): give '
            'the config name with --config'
        )
    if timestamp:
        stamp = timestamp
    elif stamp is None:
        stamp = meta.get('time') or time.strftime('%Y%m%d_%H%M%S')
    if not re.fullmatch(r'\d{8}_\d{6}', str(stamp)):
        raise UserError(f'time stamp {stamp!r} is not YYYYMMDD_HHMMSS')
    return f'{name}_{stamp}'


def load(in_file: str) -> dict:
    """The checkpoint, loaded with ``weights_only=True`` on the CPU."""
    checkpoint = read_checkpoint(in_file)
    if not isinstance(checkpoint, dict) or not isinstance(
        checkpoint.get('state_dict'), dict
    ):
        raise UserError(
            f"{in_file!r} has no 'state_dict': not an mmengine checkpoint"
        )
    return checkpoint


def publish(
    in_file: str,
    out_dir: str,
    config: Optional[str] = None,
    timestamp: Optional[str] = None,
) -> Tuple[str, dict, List[str]]:
    """Write the published checkpoint of ``in_file`` into ``out_dir``.

    Args:
        in_file (str): The training checkpoint.
        out_dir (str): The folder of the published file (made if missing).
        config (str, optional): See :func:`file_stem`. Defaults to None.
        timestamp (str, optional): See :func:`file_stem`. Defaults to None.

    Returns:
        tuple[str, dict, list[str]]: The path of the published file, what
        it holds, and the top-level keys of ``in_file`` that were dropped.

    Raises:
        UserError: On a bad input, or if the file already exists.
    """
    checkpoint = load(in_file)
    meta = checkpoint.get('meta') or {}
    stem = file_stem(meta, config, timestamp)
    published = dict(meta=meta, state_dict=checkpoint['state_dict'])
    os.makedirs(out_dir, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(published, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    out_file = osp.join(out_dir, f'{stem}-{digest[:8]}.pth')
    if osp.exists(out_file):
        raise UserError(f'{out_file!r} exists already; not overwritten')
    atomic_write(out_file, data)
    dropped = sorted(set(checkpoint) - set(KEEP_KEYS))
    return out_file, published, dropped


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        out_file, published, dropped = publish(
            args.in_file, args.out_dir, args.config, args.timestamp
        )
    except OSError as e:  # the output folder: missing rights, full disk
        raise UserError(f'cannot write to {args.out_dir!r}: {e}') from None
    meta = published['meta']
    print(f'{args.in_file} -> {out_file}')
    print(
        f'  kept: meta ({", ".join(sorted(meta))}), state_dict '
        f'({len(published["state_dict"])} tensors)'
    )
    print(f'  dropped: {", ".join(dropped) or "nothing"}')
    if 'pruning' in meta:
        from mmssm.engine.hooks import format_pruning

        print(f'  pruning: {format_pruning(meta["pruning"])}')
    else:
        print("  pruning: not recorded (no meta['pruning'])")


if __name__ == '__main__':
    main()
