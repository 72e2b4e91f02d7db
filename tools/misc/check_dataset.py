"""Find the bad samples of a config's data before a long run reads them.

Every sample's image (and label map) must exist, be non-empty and decode;
every class label must be one of the head's classes; in mmpretrain's
folder layout, every class folder must hold an image. Each problem is one
line naming the file (and the image id); the exit status is 1 if there is
any. ``tools/train.py --check-data`` runs the same check first.

Example::

    python tools/misc/check_dataset.py configs/mask_rcnn/<config>.py \\
        --splits train val
"""

import argparse
from typing import Optional, Sequence

from mmssm.errors import UserError
from mmssm.utils.cli import exit_on_user_error, load_config, runner_parser
from mmssm.utils.preflight import check_dataset


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = runner_parser(__doc__.splitlines()[0])
    parser.add_argument(
        '--splits',
        nargs='+',
        choices=['train', 'val', 'test'],
        default=['train'],
        help='the dataloaders to check. Defaults to train.',
    )
    parser.add_argument(
        '--no-decode',
        action='store_true',
        help='do not decode the images (only existence, size and labels)',
    )
    parser.add_argument(
        '--limit',
        type=int,
        default=20,
        help='stop after this many problems per split. Defaults to 20.',
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = load_config(parse_args(argv))
    args = parse_args(argv)
    for split in args.splits:
        problems = check_dataset(
            cfg, split, decode=not args.no_decode, limit=args.limit
        )
        if problems:
            raise UserError(
                f'{len(problems)} bad sample(s) in {split}_dataloader:\n  '
                + '\n  '.join(problems)
            )
        print(f'{split}: no problem found')


if __name__ == '__main__':
    main()
