"""The catalogue of tiny architectures that the tests build models from."""

import copy

#: Each family's tiny arch: 16 channels, 4 layers, the released layout
#: (PlainMamba-L1's stem conv and depthwise block after layer 0; Vim's
#: middle class token).
TINY_ARCHS = {
    'plainmamba': dict(
        embed_dims=16,
        num_layers=4,
        num_convs=1,
        dw_layers=[0],
        d_state=4,
        expand=2,
        conv_size=3,
    ),
    'vim': dict(
        embed_dims=16,
        num_layers=4,
        patch_size=16,
        stride=16,
        d_state=4,
        expand=2,
        d_conv=4,
        cls_token='middle',
    ),
}
#: The registered type of each family's backbone.
BACKBONE_TYPES = {'plainmamba': 'mmssm.PlainMamba', 'vim': 'mmssm.Vim'}
#: The schedule that stands for the paper's in a shrunk config.
TINY_PRUNE = dict(layers=(2,), keep_ratios=0.5)


def tiny_arch(family: str, **changes) -> dict:
    """A copy of the family's tiny arch with ``changes`` applied."""
    return dict(copy.deepcopy(TINY_ARCHS[family]), **changes)


def tiny_backbone_cfg(family: str, arch: dict = None, **kwargs) -> dict:
    """The config of a tiny backbone (64 x 64 ``pos_embed`` grid)."""
    kwargs.setdefault('img_size', 64)
    return dict(
        type=BACKBONE_TYPES[family],
        arch=tiny_arch(family, **(arch or {})),
        **kwargs,
    )


def family_of(backbone_type: str) -> str:
    """'plainmamba' or 'vim' from a registered type name."""
    for family, name in BACKBONE_TYPES.items():
        if backbone_type in (name, name.split('.')[-1]):
            return family
    raise KeyError(f'{backbone_type!r} is not an mmssm SSM backbone')


def shrink_prune_cfg(prune_cfg):
    """A config's ``prune_cfg`` for a tiny backbone: the paper's schedule
    (which a tiny arch has none of) becomes :data:`TINY_PRUNE`."""
    if prune_cfg == 'paper':
        return dict(TINY_PRUNE)
    if isinstance(prune_cfg, dict) and prune_cfg.get('schedule') == 'paper':
        rest = {k: v for k, v in prune_cfg.items() if k != 'schedule'}
        return dict(TINY_PRUNE, **rest)
    return prune_cfg
