"""Write the synthetic COCO instance-segmentation set of shapes.

Circles, squares and triangles on a textured background, COCO json with
polygons (see :mod:`mmssm.datasets.synthetic_coco`). The same arguments
give the same bytes; an existing set made with them is kept as it is.

Example::

    python tools/misc/make_synthetic_coco.py data/synthetic/shapes-256 \\
        --num-train 400 --num-val 50 --size 256 --seed 0
"""

import argparse
import time
from typing import Optional, Sequence

from mmssm.datasets import make_synthetic_coco
from mmssm.errors import UserError
from mmssm.utils.cli import exit_on_user_error


def _at_least(minimum: int):
    """An argparse type: an int of at least ``minimum``."""

    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f'{value} < {minimum}')
        return value

    return count


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', help='the folder to write the set to')
    parser.add_argument(
        '--num-train',
        type=_at_least(1),
        default=400,
        help='training images (400)',
    )
    parser.add_argument(
        '--num-val',
        type=_at_least(1),
        default=50,
        help='validation images (50)',
    )
    parser.add_argument(
        '--size',
        type=_at_least(1),
        nargs='+',
        default=[256],
        help='image side, or height width, in pixels (256)',
    )
    parser.add_argument(
        '--seed', type=_at_least(0), default=0, help='seed (0)'
    )
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='replace a set made with other parameters',
    )
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error(f'--size takes a side or height width, got {args.size}')
    return args


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    start = time.time()
    try:
        written = make_synthetic_coco(
            args.out_dir,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=size,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except FileExistsError as e:
        raise UserError(str(e)) from None
    if written:
        print(
            f'wrote {args.out_dir}: {args.num_train} train + {args.num_val} '
            f'val images in {time.time() - start:.1f} s'
        )
    else:
        print(f'{args.out_dir} already holds this set: kept')


if __name__ == '__main__':
    main()
