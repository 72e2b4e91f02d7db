"""The paper's pruning schedules (``prune_cfg='paper'``), per backbone.

The paper gives the layers (after the k-th layer, 1-based); it does not
give keep ratios. Each ratio, repeated at every step, is the two-decimal
value whose FLOPs come closest to the paper's Table 1, measured with
mmssm's FLOPs counter (MACs of what runs) on an ImageNet classifier (1000
classes, 224 x 224):

* PlainMamba (scan convention 'plainmamba'; dense L1 3.006 G, L2 8.060 G,
  L3 14.408 G): L1 0.80 gives 2.471 G for 2.46 (0.79: 2.448 G); L2 0.81
  gives 6.228 G for 6.27 (0.82: 6.327 G); L3 0.73 gives 8.486 G for 8.44
  (0.72: 8.337 G).
* Vim (scan convention 'vim'; dense T 1.467 G, S 5.200 G): T 0.83 gives
  1.288 G for 1.29 (0.84: 1.298 G; the official code's 0.8: 1.258 G); S
  0.81 gives 3.611 G for 3.60 (the official 0.8: 3.555 G).

The naive schedule (``align=False``) counts the same: the state advance
over the pruned tokens is not counted.
"""

from typing import Optional

from mmssm.errors import UserError

#: DyVM's learned pruning (``prune_cfg='dyvm'``): steps after these layers
#: (1-based; DyVM prunes before the 0-based layers 6, 12, 18 of Vim) and
#: the cumulative keep ratio ``r`` (``r, r**2, r**3`` of the patch tokens).
#: Vim as released (T 0.9, S and B 0.7); PlainMamba is ours (no release):
#: the brief's steps (L1 3/6/9, L2 6/12/18, L3 9/18/27) and Vim-S's 0.7.
DYVM_SCHEDULES = {
    'plainmamba': {
        'l1': dict(layers=(3, 6, 9), keep_ratios=0.7),
        'l2': dict(layers=(6, 12, 18), keep_ratios=0.7),
        'l3': dict(layers=(9, 18, 27), keep_ratios=0.7),
    },
    'vim': {
        **dict.fromkeys(
            ['t', 'tiny'], dict(layers=(6, 12, 18), keep_ratios=0.9)
        ),
        **dict.fromkeys(
            ['s', 'small'], dict(layers=(6, 12, 18), keep_ratios=0.7)
        ),
        **dict.fromkeys(
            ['b', 'base'], dict(layers=(6, 12, 18), keep_ratios=0.7)
        ),
    },
}

#: family -> arch name (with its aliases) -> ``layers`` and ``keep_ratios``.
PAPER_SCHEDULES = {
    'plainmamba': {
        'l1': dict(layers=(5, 10), keep_ratios=0.8),
        'l2': dict(layers=(5, 10, 15), keep_ratios=0.81),
        'l3': dict(layers=(5, 11, 17, 23), keep_ratios=0.73),
    },
    'vim': {
        **dict.fromkeys(
            ['t', 'tiny'], dict(layers=(10, 20), keep_ratios=0.83)
        ),
        **dict.fromkeys(
            ['s', 'small'], dict(layers=(5, 10, 15, 20), keep_ratios=0.81)
        ),
    },
}


def paper_schedule(
    family: str, arch: Optional[str], schedule: str = 'paper'
) -> dict:
    """The paper's ``layers`` and ``keep_ratios`` for a backbone's arch.

    Args:
        family (str): The backbone's family ('plainmamba' or 'vim').
        arch (str, optional): The arch name; None for an arch given as a
            dict, which has no paper schedule.
        schedule (str): 'paper' (:data:`PAPER_SCHEDULES`) or 'dyvm'
            (:data:`DYVM_SCHEDULES`). Defaults to 'paper'.

    Returns:
        dict: ``layers`` and ``keep_ratios``.
    """
    table = DYVM_SCHEDULES if schedule == 'dyvm' else PAPER_SCHEDULES
    schedules = table.get(family, {})
    key = arch.lower() if isinstance(arch, str) else None
    if key not in schedules:
        known = sorted(schedules) or 'none'
        raise UserError(
            f'prune_cfg {schedule!r}: the paper has no schedule for '
            f'{family} arch {arch!r} (it has {known}); give layers and '
            f'keep_ratios'
        )
    return dict(schedules[key])
