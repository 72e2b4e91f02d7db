"""ViT-Adapter around a token-pruned vision SSM backbone."""

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mmssm.models.layers import build_norm
from mmssm.models.layers.adapter_modules import (
    InteractionBlock,
    SpatialPriorModule,
    grid_reference_points,
    level_inputs,
    token_reference_points,
)
from mmssm.registry import MODELS


@MODELS.register_module()
class ViTAdapter(BaseModule):
    """ViT-Adapter (Chen et al., ICLR 2023) for PlainMamba and Vim.

    A reimplementation of `Vision Transformer Adapter for Dense Predictions
    <https://arxiv.org/abs/2205.08534>`_ (czczup/ViT-Adapter) as PlainMamba's
    detection adapter uses it, adapted to backbones that prune tokens as
    they run. A spatial prior module (a small CNN) gives features ``c1`` ..
    ``c4`` at 1/4 .. 1/32; ``c2``, ``c3``, ``c4`` (plus ``level_embed``)
    form the prior ``c``. For each interaction group ``[start, end]`` of
    backbone layers:

    1. the injector updates the backbone's *kept* tokens,
       ``x = x + gamma * DeformAttn(LN(x), LN(c))`` over the 3 levels of
       ``c``, each token's reference point at its own grid cell (from
       ``state.index``, or every cell while nothing is pruned); pruned
       tokens stay frozen;
    2. ``backbone.run_layers(state, start, end + 1)`` runs the group (and
       prunes after the layers its schedule names);
    3. the extractor reads the full grid ``state.full()`` (kept tokens
       scattered back among the frozen pruned ones),
       ``c = c + DeformAttn(LN(c), LN(x))``, then
       ``c = c + ConvFFN(LN(c))`` (a depthwise 3x3 conv on each level);
       the last interaction adds two extra extractors.

    So pruning removes backbone work while the outputs keep every position.
    A learned pruner (DyVM's ``mmssm.LearnedTokenPruner``) runs the same
    way at inference; in training its state is masked and full length: the
    injector updates every token, ``run_layers`` restores the masked ones
    (frozen at their pruning, as deleted ones), and the extractor reads the
    same full grid, so training equals inference for the same decisions;
    its auxiliary losses reach the detector's loss dict through
    :class:`~mmssm.engine.hooks.DyVMAuxLossHook`.
    Finally ``c1 = up(c2) + c1``; with ``add_vit_feature`` the backbone's
    full grid, bilinearly resized to each level, is added; each level goes
    through its norm (``ad_norm1`` .. ``ad_norm4``).

    Input size: the input is zero-padded at the bottom/right to a multiple
    of 32 (after normalisation zero is the mean pixel, the value mmdet's and
    mmseg's data preprocessors pad with), so the prior's levels and the
    backbone's stride-16 grid line up; the outputs are then cropped to
    ``ceil(H / s) x ceil(W / s)`` at stride ``s``, the sizes a stride-``s``
    CNN gives. With ``pad_size_divisor=32`` in the data preprocessor both
    steps do nothing.

    Hyper-parameters of the released detectors (PlainMamba's configs; the
    adapter's drop path equals the backbone's there):

    ============  =====  ========  ======================================  ====
    backbone      embed  deform    interaction_indexes                     drop
                         heads                                             path
    ============  =====  ========  ======================================  ====
    PlainMamba-L1 192    6         [[0,5],[6,11],[12,17],[18,23]]          0.1
    PlainMamba-L2 384    6         [[0,5],[6,11],[12,17],[18,23]]          0.2
    PlainMamba-L3 448    8         [[0,8],[9,17],[18,26],[27,35]]          0.3
    Vim-T / Vim-S 192    6         [[0,5],[6,11],[12,17],[18,23]]          --
                  / 384
    ============  =====  ========  ======================================  ====

    with ``conv_inplane=64``, ``n_points=4``, ``cffn_ratio=0.25``,
    ``deform_ratio=1.0``, ``init_values=0``, ``add_vit_feature=True`` and
    the backbone's ``final_norm=False``. Vim must be built with
    ``cls_token=None`` (as the official Vim detection and segmentation code
    does).

    Args:
        backbone (dict): Config of an mmssm SSM backbone with the token
            layer API (``init_tokens``, ``run_layers``, ``embed_dims``,
            ``num_layers``) on a stride-16 grid and without a class token,
            e.g. ``dict(type='mmssm.PlainMamba', arch='l1')``. Its
            ``final_norm`` defaults to False here (the adapter norms the
            features itself; a final norm would get no gradient, so it is
            refused). Pretrained weights go in its own ``init_cfg``.
        conv_inplane (int): Channels of the spatial prior's stem.
            Defaults to 64.
        n_points (int): Sampling points of the deformable attention.
            Defaults to 4.
        deform_num_heads (int): Heads of the deformable attention.
            Defaults to 6.
        init_values (float): Initial ``gamma`` of the injectors.
            Defaults to 0.
        interaction_indexes (Sequence[Sequence[int]], optional): ``[start,
            end]`` (inclusive) backbone layers of each interaction; they
            must cover the layers in order. None splits ``num_layers`` into
            four equal groups (e.g. ``[[0, 5], [6, 11], [12, 17], [18,
            23]]`` for 24 layers). Defaults to None.
        with_cffn (bool): ConvFFN in the extractors. Defaults to True.
        cffn_ratio (float): Hidden ratio of the ConvFFN. Defaults to 0.25.
        deform_ratio (float): Value-projection ratio of the deformable
            attention. Defaults to 1.0.
        add_vit_feature (bool): Add the resized backbone features to the
            outputs. Defaults to True.
        prior_gamma_init (float, optional): None (the released adapter):
            each output is the spatial prior after the interactions, plus
            the backbone features. A float: each output is the spatial
            prior module's own map plus ``gamma`` times all that the
            interactions and the backbone add to it, ``gamma`` a learnable
            per-channel scale of each output (``prior_gamma``, (4, C))
            initialised to this value; 1.0 gives the released adapter's
            outputs. 0 starts a randomly initialised model from the
            spatial prior alone: the additions of a random backbone swamp
            the prior's features and keep a detector trained from scratch
            from learning (see the main job's config). Defaults to None.
        use_extra_extractor (bool): Two extra extractors in the last
            interaction. Defaults to True.
        drop_path_rate (float, optional): Drop path of the ConvFFNs; None
            takes the backbone config's ``drop_path_rate`` (as the released
            adapter, which shares it). Defaults to None.
        norm_cfg (dict): Config of the batch norms (spatial prior and the
            output norms), e.g. ``dict(type='SyncBN')`` for multi-GPU
            training. Defaults to ``dict(type='BN')``.
        layer_norm_cfg (dict): Config of the injectors' and extractors'
            norms. Defaults to ``dict(type='LN', eps=1e-6)``.
        with_cp (bool): Checkpoint the injectors and extractors while
            training (the backbone has its own ``with_cp``).
            Defaults to False.
        init_cfg (dict | list[dict], optional): Initialisation config of
            the adapter. The adapter's modules are initialised at
            construction as the original does. Defaults to None.
    """

    def __init__(
        self,
        backbone: dict,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 6,
        init_values: float = 0.0,
        interaction_indexes: Optional[Sequence[Sequence[int]]] = None,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        deform_ratio: float = 1.0,
        add_vit_feature: bool = True,
        prior_gamma_init: Optional[float] = None,
        use_extra_extractor: bool = True,
        drop_path_rate: Optional[float] = None,
        norm_cfg: Optional[dict] = None,
        layer_norm_cfg: Optional[dict] = None,
        with_cp: bool = False,
        init_cfg: Optional[Union[dict, List[dict]]] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        norm_cfg = norm_cfg or dict(type='BN')
        layer_norm_cfg = layer_norm_cfg or dict(type='LN', eps=1e-6)
        backbone = dict(backbone)
        backbone.setdefault('final_norm', False)
        # unprefixed types are mmssm's, also under the mmdet/mmseg scope
        backbone.setdefault('_scope_', 'mmssm')
        if drop_path_rate is None:
            drop_path_rate = float(backbone.get('drop_path_rate', 0.0))
        self.backbone = MODELS.build(backbone)
        self._check_backbone()
        self.embed_dims = C = int(self.backbone.embed_dims)
        self.num_layers = int(self.backbone.num_layers)
        self.interaction_indexes = self._parse_indexes(interaction_indexes)
        self.add_vit_feature = add_vit_feature
        self.drop_path_rate = drop_path_rate

        self.level_embed = nn.Parameter(torch.zeros(3, C))
        self.level_embed._no_weight_decay = True
        self.spm = SpatialPriorModule(
            inplanes=conv_inplane,
            embed_dims=C,
            in_channels=int(backbone.get('in_channels', 3)),
            norm_cfg=norm_cfg,
        )
        n = len(self.interaction_indexes)
        self.interactions = nn.Sequential(
            *[
                InteractionBlock(
                    C,
                    num_heads=deform_num_heads,
                    n_points=n_points,
                    init_values=init_values,
                    deform_ratio=deform_ratio,
                    with_cffn=with_cffn,
                    cffn_ratio=cffn_ratio,
                    drop_path=drop_path_rate,
                    extra_extractor=use_extra_extractor and i == n - 1,
                    layer_norm_cfg=layer_norm_cfg,
                    with_cp=with_cp,
                )
                for i in range(n)
            ]
        )
        self.up = nn.ConvTranspose2d(C, C, 2, 2)
        self.prior_gamma = None
        if prior_gamma_init is not None:
            self.prior_gamma = nn.Parameter(
                torch.full((4, C), float(prior_gamma_init))
            )
            self.prior_gamma._no_weight_decay = True  # a scale, as gammas
        for i in range(1, 5):
            self.add_module(f'ad_norm{i}', build_norm(norm_cfg, C))
        self._init_adapter_weights()

    # ----------------------------------------------------------- arguments
    def _check_backbone(self) -> None:
        bb = self.backbone
        for name in ('init_tokens', 'run_layers', 'embed_dims', 'num_layers'):
            if not hasattr(bb, name):
                raise TypeError(
                    f'ViTAdapter needs a backbone with the token layer API '
                    f'(init_tokens, run_layers, embed_dims, num_layers); '
                    f'{type(bb).__name__} has no {name!r}'
                )
        if getattr(bb, 'num_extra_tokens', 0):
            raise ValueError(
                f'ViTAdapter needs a backbone without a class token, but '
                f'this {type(bb).__name__} has one: build it with '
                f'cls_token=None (as the official Vim detection and '
                f'segmentation code does)'
            )
        if getattr(bb, 'final_norm', False):
            raise ValueError(
                'ViTAdapter reads the raw tokens of the backbone and norms '
                'the outputs itself: build the backbone with '
                'final_norm=False (its final norm would get no gradient)'
            )

    def _parse_indexes(
        self, indexes: Optional[Sequence[Sequence[int]]]
    ) -> Tuple[Tuple[int, int], ...]:
        n = self.num_layers
        if indexes is None:
            if n < 4:
                raise ValueError(
                    f'cannot split {n} backbone layers into 4 interactions: '
                    f'give interaction_indexes'
                )
            sizes = [n // 4 + (1 if i < n % 4 else 0) for i in range(4)]
            bounds = [sum(sizes[:i]) for i in range(5)]
            return tuple((bounds[i], bounds[i + 1] - 1) for i in range(4))
        parsed = []
        for group in indexes:
            if len(group) != 2:
                raise ValueError(
                    f'each interaction index must be [start, end], got '
                    f'{list(group)}'
                )
            parsed.append((int(group[0]), int(group[-1])))
        expected = 0
        for start, end in parsed:
            if start != expected or end < start:
                break
            expected = end + 1
        else:
            if parsed and expected == n:
                return tuple(parsed)
        raise ValueError(
            f'interaction_indexes must cover the {n} backbone layers in '
            f'order, as [[0, a], [a + 1, b], ..., [., {n - 1}]], got '
            f'{[list(g) for g in indexes]}'
        )

    def _init_adapter_weights(self) -> None:
        """The original initialisation of the adapter's own modules."""

        def init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, _BatchNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                fan_out //= m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        from mmcv.ops import MultiScaleDeformableAttention

        for module in (self.up, self.spm, self.interactions):
            module.apply(init)
        for m in self.interactions.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        nn.init.normal_(self.level_embed)

    # ------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Extract multi-scale features.

        Args:
            x (Tensor): Images (B, C, H, W), any H and W.

        Returns:
            tuple[Tensor]: Four (B, embed_dims, ceil(H / s), ceil(W / s))
            maps at the strides s = 4, 8, 16, 32.
        """
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % 32, (-W) % 32
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        Hp, Wp = x.shape[-2:]
        h, w = Hp // 16, Wp // 16
        prior_shapes = ((2 * h, 2 * w), (h, w), (h // 2, w // 2))

        c1, c2, c3, c4 = self.spm(x)
        B = x.shape[0]
        prior = [c1] + [
            t.transpose(1, 2).reshape(B, -1, a, b)
            for t, (a, b) in zip((c2, c3, c4), prior_shapes)
        ]
        level_embed = self.level_embed.to(c2.dtype)
        c = torch.cat(
            [c2 + level_embed[0], c3 + level_embed[1], c4 + level_embed[2]],
            dim=1,
        )

        state = self.backbone.init_tokens(x)
        if state.cls_index is not None:
            raise ValueError(
                'ViTAdapter needs a backbone without a class token: build '
                'it with cls_token=None'
            )
        if tuple(state.hw) != (h, w):
            raise ValueError(
                f'ViTAdapter needs a stride-16 backbone grid: a '
                f'{Hp}x{Wp} input should give a {h}x{w} grid, the backbone '
                f'gave {tuple(state.hw)}'
            )

        device = x.device
        inject_shapes, inject_start = level_inputs(prior_shapes, device)
        extract_shapes, extract_start = level_inputs([(h, w)], device)
        grid_points = grid_reference_points([(h, w)], device)
        prior_points = grid_reference_points(prior_shapes, device)

        for block, (start, end) in zip(
            self.interactions, self.interaction_indexes
        ):
            if state.index is None:
                points = grid_points
            else:
                points = token_reference_points(state.index, (h, w))
            tokens = block.injector(
                state.tokens, points, c, inject_shapes, inject_start
            )
            state = dataclasses.replace(state, tokens=tokens)
            state = self.backbone.run_layers(state, start, end + 1)
            feat = state.full()
            c = block.extract(
                c,
                prior_points,
                feat,
                extract_shapes,
                extract_start,
                prior_shapes,
            )

        c2, c3, c4 = c.split([a * b for a, b in prior_shapes], dim=1)
        c2, c3, c4 = (
            t.transpose(1, 2).reshape(B, -1, a, b)
            for t, (a, b) in zip((c2, c3, c4), prior_shapes)
        )
        c1 = self.up(c2) + c1
        outs = [c1, c2, c3, c4]

        if self.add_vit_feature:
            x3 = feat.transpose(1, 2).reshape(B, -1, h, w)
            x3 = x3.to(c3.dtype)
            for i, scale in ((0, 4), (1, 2), (3, 0.5)):
                outs[i] = outs[i] + F.interpolate(
                    x3,
                    scale_factor=scale,
                    mode='bilinear',
                    align_corners=False,
                )
            outs[2] = outs[2] + x3
        if self.prior_gamma is not None:
            # the prior's own map + gamma * what the rest added to it
            gamma = self.prior_gamma.to(c1.dtype)[:, :, None, None]
            outs = [p + g * (o - p) for p, g, o in zip(prior, gamma, outs)]

        results = []
        for i, (out, stride) in enumerate(zip(outs, (4, 8, 16, 32))):
            # contiguous NCHW maps (the 1x1 convs of FPN and UperNet get
            # weight gradients of the parameters' strides, as DDP expects)
            out = out[..., : -(-H // stride), : -(-W // stride)].contiguous()
            results.append(getattr(self, f'ad_norm{i + 1}')(out))
        return tuple(results)
