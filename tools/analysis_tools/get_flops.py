"""Count the parameters and FLOPs (multiply-accumulates) of a config's model.

The model is built from the config and run once on a random input; what
really runs is counted (see :mod:`mmssm.utils.flops` and docs/flops.md).
Classifiers (mmpretrain configs, ``default_scope='mmpretrain'``) and bare
mmssm models (``type='mmssm.*'``) are counted whole (a classifier's
'tensor' forward: backbone, pooling and head); detectors and segmentors
(mmdet, mmseg) count the parameters of the whole model and the FLOPs of
``extract_feat`` (backbone and neck), the papers' figures.

The last two lines printed are ``Params: <x.xx> M`` and ``FLOPs: <x.xx> G``.

Example::

    python tools/analysis_tools/get_flops.py \\
        configs/plainmamba/plainmamba-l1_8xb64_in1k.py --shape 224
"""

import argparse
import importlib
import os.path as osp
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config, DictAction

from mmssm.utils.cli import exit_on_user_error
from mmssm.utils.flops import (
    SCAN_CONVENTIONS,
    count_flops,
    count_params,
    infer_scan_convention,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=[224],
        help='input size: H, or H W. Defaults to 224.',
    )
    parser.add_argument(
        '--scan-convention',
        default='auto',
        choices=['auto', *SCAN_CONVENTIONS],
        help="MACs per scanned element: 'plainmamba' (9) or 'vim' (3); "
        "'auto' takes the model family's (the convention of its published "
        'figures). Defaults to auto.',
    )
    parser.add_argument(
        '--device',
        default='cpu',
        choices=['cpu', 'meta'],
        help="where to run: 'meta' only propagates shapes (fast, for large "
        'inputs; the backbones support it). Defaults to cpu.',
    )
    parser.add_argument(
        '--direction-keep',
        default=None,
        help="DyVM's FLOPs rule for models with direction gates: count "
        "every direction, then scale each layer's per-direction part by "
        'this kept fraction (a number, e.g. one measured with '
        "mmssm.utils.flops.measure_direction_keep, or 'target': the "
        "config's model.direction_ratio_loss.target). Defaults to none: "
        'count what runs on the random input.',
    )
    parser.add_argument(
        '--depth',
        type=int,
        default=0,
        help='also print the FLOPs per module, grouped by the first DEPTH '
        'components of the module names (0: off). Defaults to 0.',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value',
    )
    args = parser.parse_args()
    if len(args.shape) not in (1, 2):
        parser.error(f'--shape takes H or H W, got {args.shape}')
    if not osp.isfile(args.config):
        parser.error(f'config file not found: {args.config}')
    return args


def build_model(cfg: Config) -> Tuple[nn.Module, bool]:
    """Build ``cfg.model`` from the right registry.

    Returns:
        tuple[nn.Module, bool]: The model, and whether it is counted whole
        (an mmssm model or an mmpretrain classifier) rather than by
        ``extract_feat`` (an mmdet/mmseg model).
    """
    model_cfg = cfg.model
    model_type = str(model_cfg.get('type', ''))
    if model_type.startswith('mmssm.'):
        import mmssm.models  # noqa: F401  (registers the modules)
        from mmssm.registry import MODELS

        return MODELS.build(model_cfg), True
    scope = cfg.get('default_scope')
    if scope is None:
        raise SystemExit(
            f'cannot tell which registry builds the model type '
            f'{model_type!r}: use an mmssm.* type or set default_scope'
        )
    from mmengine.registry import init_default_scope

    import mmssm.models  # noqa: F401

    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    # as the Runner: the config's data_preprocessor is the model's default
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    return registry.build(model_cfg), scope in ('mmssm', 'mmpretrain')


@exit_on_user_error
def main() -> None:
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    H, W = (args.shape * 2)[:2]
    device = torch.device(args.device)
    model, whole = build_model(cfg)
    model = model.to(device)
    inputs = torch.randn(1, 3, H, W, device=device)
    forward: Optional[Callable[[nn.Module, Any], Any]] = None
    if not whole and hasattr(model, 'extract_feat'):

        def forward(m: nn.Module, x: torch.Tensor) -> Any:
            return m.extract_feat(x)

    convention = args.scan_convention
    if convention == 'auto':
        convention = infer_scan_convention(model)
        if convention is None:
            raise SystemExit(
                'no known SSM family in the model: pass --scan-convention '
                f'({"/".join(SCAN_CONVENTIONS)})'
            )
    keep = args.direction_keep
    if keep == 'target':
        target = cfg.model.get('direction_ratio_loss') or {}
        if 'target' not in target:
            raise SystemExit(
                '--direction-keep target: the config has no '
                'model.direction_ratio_loss.target'
            )
        keep = target['target']
    elif keep is not None:
        try:
            keep = float(keep)
        except ValueError:
            raise SystemExit(
                f"--direction-keep takes a number or 'target', got {keep!r}"
            ) from None
    report = count_flops(
        model, inputs, convention, forward=forward, direction_keep=keep
    )

    what = 'whole model' if whole else 'extract_feat (backbone + neck)'
    print(f'config: {args.config}')
    print(f'input: 1x3x{H}x{W}; FLOPs of: {what}; device: {args.device}')
    print(f'scan convention: {convention} ({args.scan_convention})')
    if keep is not None:
        print(f'direction keep (DyVM rule): {keep}')
    print()
    print(report.table())
    if args.depth > 0:
        print()
        print('| module | linear (G) | conv (G) | scan (G) | total (G) |')
        print('|---|---:|---:|---:|---:|')
        for name, c in report.by_prefix(args.depth).items():
            cells = ' | '.join(
                f'{c[k] / 1e9:.3f}' for k in ('linear', 'conv', 'scan')
            )
            print(f'| {name or "(root)"} | {cells} | {c["total"] / 1e9:.3f} |')
    parts = [
        f'{name} {count_params(child) / 1e6:.2f} M'
        for name, child in model.named_children()
        if count_params(child)
    ]
    if parts:
        print()
        print(f'params by part: {", ".join(parts)}')
    print()
    print(f'Params: {report.params / 1e6:.2f} M')
    print(f'FLOPs: {report.total / 1e9:.2f} G')


if __name__ == '__main__':
    main()
