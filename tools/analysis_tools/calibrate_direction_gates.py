"""Calibrate the eval threshold of DyVM's direction gates to a budget.

Builds the config's model, loads the checkpoint (strictly: it must hold
exactly the model's weights), runs the model in eval mode on a split of the
config's data and sets one threshold on the gates' logits, shared by all of
them, so that the kept fraction of the (image, layer, direction) bits
equals ``--target`` (see
:func:`mmssm.models.layers.direction_gate.calibrate_direction_gates`).
Prints the kept fraction before (the config's threshold) and after, and
the ``--cfg-options`` that runs the model at the calibrated threshold
(e.g. with tools/test.py or get_flops.py); ``--out`` also writes them as
JSON. Example::

    python tools/analysis_tools/calibrate_direction_gates.py \\
        configs/dyvm/dyvm_vim-s_8xb32-30e_in1k.py dyvm_vim-s.pth \\
        --target 0.8 --split val --num-batches 50 --out calibration.json
"""

import json
from itertools import islice
from typing import Any, List, Optional, Sequence, Tuple

from mmengine.config import Config

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.errors import UserError
from mmssm.models.layers.direction_gate import calibrate_direction_gates
from mmssm.utils.checkpoint import check_checkpoint, load_checkpoint_strict
from mmssm.utils.cli import (
    build_runner,
    exit_on_user_error,
    load_config,
    runner_parser,
)
from mmssm.utils.fileio import atomic_write

SPLITS = ('train', 'val', 'test')


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = runner_parser(__doc__.splitlines()[0])
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--target',
        type=float,
        required=True,
        help='the kept fraction of the directions, in (0, 1] (the '
        "config's model.direction_ratio_loss.target, e.g. 0.8)",
    )
    parser.add_argument(
        '--split',
        default='val',
        choices=SPLITS,
        help="the held-out data: the config's <split>_dataloader. "
        'Defaults to val.',
    )
    parser.add_argument(
        '--num-batches',
        type=int,
        default=None,
        help='calibrate on the first N batches. Defaults to all.',
    )
    parser.add_argument(
        '--out', help='also write the result to this JSON file'
    )
    return parser.parse_args(argv)


def gate_keys(node: Any, prefix: str = 'model') -> List[Tuple[str, Any]]:
    """Every ``direction_gate`` setting in the model config, with its
    dotted key (the backbone's: ``model.backbone`` or, in an adapter,
    ``model.backbone.backbone``)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'direction_gate':
                found.append((f'{prefix}.{key}', value))
            else:
                found.extend(gate_keys(value, f'{prefix}.{key}'))
    return found


def threshold_options(cfg: Config, threshold: float) -> List[str]:
    """The ``--cfg-options`` that set the gates' eval threshold.

    A config's ``direction_gate=True`` is a bool, which a dotted key cannot
    extend: it is replaced by ``dict(threshold_logit=T)`` (``_delete_``);
    a dict of gate options keeps its other options.
    """
    options = []
    for key, value in gate_keys(cfg.model):
        if value is False or value is None:
            continue
        if not isinstance(value, dict):
            options.append(f'{key}._delete_=True')
        options.append(f'{key}.threshold_logit={threshold!r}')
    if not options:
        raise UserError(
            'the config sets no direction_gate in its model: nothing to '
            'calibrate'
        )
    return options


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if not 0 < args.target <= 1:
        raise UserError(f'--target must be in (0, 1], got {args.target}')
    if args.num_batches is not None and args.num_batches < 1:
        raise UserError(
            f'--num-batches must be at least 1, got {args.num_batches}'
        )
    cfg = load_config(args)
    loader_cfg = cfg.get(f'{args.split}_dataloader')
    if not loader_cfg:
        raise UserError(f'the config has no {args.split}_dataloader (--split)')
    check_checkpoint(args.checkpoint, 'checkpoint')
    runner = build_runner(cfg, args.config)
    model = runner.model
    load_checkpoint_strict(model, args.checkpoint)
    loader = runner.build_dataloader(loader_cfg)
    batches = list(islice(loader, args.num_batches))
    result = calibrate_direction_gates(
        model,
        batches,
        args.target,
        forward=lambda m, batch: m.test_step(batch),
    )
    result['options'] = threshold_options(cfg, result['threshold_logit'])
    result.update(split=args.split, num_batches=len(batches))
    print(
        f'direction keep on {len(batches)} {args.split} batches '
        f'({result["num_bits"]} bits): {result["keep_before"]:.4f} before '
        f"(the config's threshold), {result['keep_after']:.4f} after "
        f'(target {args.target})'
    )
    print(f'threshold_logit: {result["threshold_logit"]!r}')
    print(f'run it with: --cfg-options {" ".join(result["options"])}')
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2) + '\n')
    return result


if __name__ == '__main__':
    main()
