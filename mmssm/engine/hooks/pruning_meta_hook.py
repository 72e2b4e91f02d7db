"""Record the token-pruning schedule of a model in its checkpoints.

mmengine's Runner saves the config text and the training set's
``dataset_meta`` in a checkpoint's ``meta``; :class:`PruningMetaHook` adds
``meta['pruning']``: the schedule that each mmssm backbone of the model
really ran with (``prune_cfg='paper'`` resolved to its layers and keep
ratios), so that a published checkpoint says how it was pruned without its
config.
"""

import copy
from typing import Dict, Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import nn

from mmssm.models.pruning import TokenPruner
from mmssm.registry import HOOKS


def pruner_meta(pruner: Optional[TokenPruner]) -> Optional[dict]:
    """A pruner's schedule as plain types (None: no pruning).

    Args:
        pruner (TokenPruner, optional): The pruner of a backbone.

    Returns:
        dict | None: ``layers`` (1-based: pruned after the k-th layer),
        ``keep_ratios`` (one per step), ``scorer``, ``align`` and
        ``gap_mode``; None for a dense backbone.
    """
    if pruner is None:
        return None
    return dict(
        layers=[int(k) for k in pruner.layers],
        keep_ratios=[float(r) for r in pruner.keep_ratios],
        scorer=copy.deepcopy(pruner.scorer_cfg),
        align=bool(pruner.align),
        gap_mode=str(pruner.gap_mode),
    )


def pruning_meta(model: nn.Module) -> Dict[str, Optional[dict]]:
    """The pruning schedule of every mmssm backbone of a model.

    Args:
        model (nn.Module): The model (a model wrapper is unwrapped).

    Returns:
        dict: Maps the name of each module that has a token pruner slot
        (``PlainMamba``, ``Vim``; e.g. ``'backbone.backbone'`` inside a
        ViT-Adapter) to :func:`pruner_meta` of its pruner, with its
        ``type`` and ``num_layers`` added; a dense backbone maps to
        ``None``. Empty if the model has no mmssm backbone.
    """
    if is_model_wrapper(model):
        model = model.module
    found = {}
    for name, module in model.named_modules():
        if not type(module).__module__.startswith('mmssm.'):
            continue
        pruner = getattr(module, 'pruner', False)
        if pruner is not None and not isinstance(pruner, TokenPruner):
            continue
        meta = pruner_meta(pruner)
        if meta is not None:
            meta = dict(
                type=type(module).__name__,
                num_layers=int(pruner.num_layers),
                **meta,
            )
        found[name] = meta
    return found


def format_pruning(meta: Dict[str, Optional[dict]]) -> str:
    """A one-line summary of :func:`pruning_meta`, for logs."""
    if not meta:
        return 'no mmssm backbone'
    parts = []
    for name, schedule in meta.items():
        where = name or 'model'
        if schedule is None:
            parts.append(f'{where}: dense')
            continue
        mode = (
            f'aligned ({schedule["gap_mode"]})'
            if schedule['align']
            else 'naive (not aligned)'
        )
        parts.append(
            f'{where}: {schedule["type"]} pruned after layers '
            f'{schedule["layers"]} keeping {schedule["keep_ratios"]}, '
            f'scorer {schedule["scorer"]!r}, {mode}'
        )
    return '; '.join(parts)


@HOOKS.register_module()
class PruningMetaHook(Hook):
    """Write the model's token-pruning schedule into checkpoint meta.

    In every checkpoint the Runner saves, ``meta['pruning']`` becomes
    :func:`pruning_meta` of the model: for each mmssm backbone (by module
    name) its resolved schedule, or None if it is dense. The schedule is
    also logged once when the run starts. Add it to a config with::

        custom_hooks = [dict(type='mmssm.PruningMetaHook')]
    """

    priority = 'VERY_LOW'

    def before_run(self, runner) -> None:
        """Log the schedule the run uses."""
        print_log(
            'token pruning: ' + format_pruning(pruning_meta(runner.model)),
            logger='current',
        )

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Add ``meta['pruning']`` to the checkpoint being saved."""
        meta = checkpoint.setdefault('meta', {})
        meta['pruning'] = pruning_meta(runner.model)
