"""Building blocks of the ViT-Adapter (Chen et al., ICLR 2023).

Written after the structure of ``czczup/ViT-Adapter`` and of PlainMamba's
detection adapter: a spatial prior module (a small CNN giving 1/4 .. 1/32
features), an injector (backbone tokens attend to the spatial prior with
multi-scale deformable attention) and an extractor (the spatial prior
attends to the backbone tokens, then a ConvFFN with a depthwise 3x3 conv on
each level). The deformable attention is mmcv's
:class:`~mmcv.ops.MultiScaleDeformableAttention`, which runs its PyTorch
path (``multi_scale_deformable_attn_pytorch``) for every tensor that is not
on a CUDA (or MLU) device. Parameter names follow the original modules.

mmcv is imported when a block is built, so that ``import mmssm`` works
without it.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from torch import Tensor

from .norm import build_norm

Shapes = Sequence[Tuple[int, int]]

# The blocks' norms when ``layer_norm_cfg`` is None (the original's eps).
_LAYER_NORM_CFG = dict(type='LN', eps=1e-6)


def _build_deform_attn(
    dims: int,
    num_heads: int,
    num_levels: int,
    num_points: int,
    ratio: float,
) -> nn.Module:
    try:
        from mmcv.ops import MultiScaleDeformableAttention
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            'the ViT-Adapter needs mmcv (2.x, with ops) for '
            f'MultiScaleDeformableAttention: {e}'
        ) from e
    return MultiScaleDeformableAttention(
        embed_dims=dims,
        num_heads=num_heads,
        num_levels=num_levels,
        num_points=num_points,
        dropout=0.0,
        batch_first=True,
        value_proj_ratio=ratio,
    )


def _deform_attn_meta(attn: nn.Module, query: Tensor, value: Tensor) -> Tensor:
    """mmcv's deformable attention ``attn`` on the meta device: shapes only.

    mmcv reads the level sizes as numbers (an assert, the split of its
    PyTorch path), which meta tensors do not hold. Its four projections run
    as in mmcv, so a FLOP count matches the CPU's; the bilinear sampling
    between them, which no counter counts, becomes an empty tensor of its
    shape.
    """
    value = attn.value_proj(value)
    attn.sampling_offsets(query)
    attn.attention_weights(query).softmax(-1)
    sampled = value.new_empty(*query.shape[:2], value.shape[-1])
    return attn.output_proj(sampled)


def _build_drop_path(drop_prob: float) -> nn.Module:
    if drop_prob <= 0:
        return nn.Identity()
    from mmcv.cnn.bricks import DropPath

    return DropPath(drop_prob)


# --------------------------------------------------------------------------
# Deformable-attention inputs
# --------------------------------------------------------------------------
def level_inputs(
    shapes: Shapes, device: Union[str, torch.device]
) -> Tuple[Tensor, Tensor]:
    """``spatial_shapes`` (L, 2) and ``level_start_index`` (L,) of levels.

    Args:
        shapes (Sequence[tuple[int, int]]): (h, w) of each level.
        device (str | torch.device): Where to put the tensors.

    Returns:
        tuple[Tensor, Tensor]: Both int64.
    """
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def grid_reference_points(
    shapes: Shapes,
    device: Union[str, torch.device],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Normalised (x, y) centres of every cell of one or more grids.

    Args:
        shapes (Sequence[tuple[int, int]]): (h, w) of each grid; the cells
            are listed grid after grid, each in raster order.
        device (str | torch.device): Where to put the points.
        dtype (torch.dtype): Defaults to float32.

    Returns:
        Tensor: (1, sum(h * w), 1, 2), in [0, 1].
    """
    points = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        ys, xs = torch.meshgrid(ys, xs, indexing='ij')
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    return torch.cat(points, 0)[None, :, None]


def token_reference_points(
    index: Tensor, hw: Tuple[int, int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Normalised (x, y) grid centres of tokens at raster positions.

    Args:
        index (Tensor): (B, K) int64 raster positions on the (h, w) grid.
        hw (tuple[int, int]): The grid (h, w).
        dtype (torch.dtype): Defaults to float32.

    Returns:
        Tensor: (B, K, 1, 2), in [0, 1].
    """
    h, w = hw
    x = ((index % w).to(dtype) + 0.5) / w
    y = (torch.div(index, w, rounding_mode='floor').to(dtype) + 0.5) / h
    return torch.stack([x, y], -1)[:, :, None]


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------
class SpatialPriorModule(nn.Module):
    """A small CNN giving the adapter's 1/4, 1/8, 1/16, 1/32 features.

    ``stem``: three 3x3 convs (the first stride 2) + norm + ReLU, then a 3x3
    stride-2 max pool (1/4); ``conv2``/``conv3``/``conv4``: a 3x3 stride-2
    conv + norm + ReLU each (1/8, 1/16, 1/32, with ``2``, ``4`` and ``4``
    times ``inplanes`` channels); ``fc1`` .. ``fc4``: 1x1 projections to
    ``embed_dims``.

    Args:
        inplanes (int): Channels of the stem. Defaults to 64.
        embed_dims (int): Output channels. Defaults to 384.
        in_channels (int): Image channels. Defaults to 3.
        norm_cfg (dict): Config of the norms. Defaults to
            ``dict(type='BN')``.
    """

    def __init__(
        self,
        inplanes: int = 64,
        embed_dims: int = 384,
        in_channels: int = 3,
        norm_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type='BN')

        def conv_block(c_in: int, c_out: int, stride: int) -> List[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                build_norm(norm_cfg, c_out),
                nn.ReLU(inplace=True),
            ]

        self.stem = nn.Sequential(
            *conv_block(in_channels, inplanes, 2),
            *conv_block(inplanes, inplanes, 1),
            *conv_block(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*conv_block(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_block(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv_block(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dims, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dims, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dims, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dims, 1)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Compute the spatial prior.

        Args:
            x (Tensor): Images (B, C, H, W), H and W multiples of 32.

        Returns:
            tuple[Tensor]: ``c1`` (B, D, H/4, W/4), then ``c2``, ``c3``,
            ``c4`` as tokens (B, h*w, D) of the 1/8, 1/16, 1/32 grids.
        """
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        outs = [self.fc1(c1)]
        for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4)):
            outs.append(fc(c).flatten(2).transpose(1, 2))
        return tuple(outs)


class DWConv(nn.Module):
    """A depthwise 3x3 conv applied to each level of a token pyramid.

    Args:
        dims (int): Channels.
    """

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dims, dims, 3, 1, 1, groups=dims)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        """Args:
            x (Tensor): (B, sum(h * w), C), the levels one after another.
            shapes (Sequence[tuple[int, int]]): (h, w) of each level.

        Returns:
            Tensor: Same shape as ``x``.
        """
        B, _, C = x.shape
        levels = x.split([h * w for h, w in shapes], dim=1)
        outs = []
        for t, (h, w) in zip(levels, shapes):
            # contiguous NCHW: a channels-last input gives the conv weight a
            # gradient of other strides, which DDP copies at every step
            t = t.transpose(1, 2).reshape(B, C, h, w).contiguous()
            outs.append(self.dwconv(t).flatten(2).transpose(1, 2))
        return torch.cat(outs, dim=1)


class ConvFFN(nn.Module):
    """``fc2(GELU(DWConv(fc1(x))))`` on a token pyramid.

    Args:
        in_features (int): Input and output channels.
        hidden_features (int): Hidden channels.
    """

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), shapes)))


class _DeformBlock(nn.Module):
    """What the injector and the extractor share.

    ``query = update(query, DeformAttn(LN(query), LN(feat)))``, with the
    norms ``query_norm`` and ``feat_norm``, mmcv's deformable attention
    ``attn`` and checkpointing; a subclass defines :meth:`update`.

    Args:
        dims (int): Channels.
        num_heads (int): Deformable-attention heads. Defaults to 6.
        n_points (int): Sampling points per head and level. Defaults to 4.
        n_levels (int): Levels of the features attended to. Defaults to 1.
        deform_ratio (float): Value-projection ratio. Defaults to 1.0.
        layer_norm_cfg (dict, optional): The norms; None is
            ``dict(type='LN', eps=1e-6)``. Defaults to None.
        with_cp (bool): Checkpoint the block while training.
            Defaults to False.
    """

    def __init__(
        self,
        dims: int,
        num_heads: int = 6,
        n_points: int = 4,
        n_levels: int = 1,
        deform_ratio: float = 1.0,
        layer_norm_cfg: Optional[dict] = None,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.layer_norm_cfg = layer_norm_cfg or _LAYER_NORM_CFG
        self.with_cp = with_cp
        self.query_norm = build_norm(self.layer_norm_cfg, dims)
        self.feat_norm = build_norm(self.layer_norm_cfg, dims)
        self.attn = _build_deform_attn(
            dims, num_heads, n_levels, n_points, deform_ratio
        )

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        feat: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        *args,
    ) -> Tensor:
        """Let ``query`` attend to ``feat`` and update it.

        Args:
            query (Tensor): (B, K, C).
            reference_points (Tensor): (B or 1, K, 1, 2), the query's
                positions, normalised.
            feat (Tensor): The features attended to (B, N, C), the levels
                one after another.
            spatial_shapes (Tensor): (n_levels, 2) of ``feat``.
            level_start_index (Tensor): (n_levels,) of ``feat``.
            *args: The rest of :meth:`update`'s arguments.

        Returns:
            Tensor: The updated query (B, K, C).
        """

        def inner(query: Tensor, feat: Tensor) -> Tensor:
            normed = self.query_norm(query)
            if normed.is_meta:
                attn = _deform_attn_meta(
                    self.attn, normed, self.feat_norm(feat)
                )
                return self.update(query, attn, *args)
            # mmcv adds its ``identity`` to the attention; zero leaves the
            # residual (and its scale) to ``update``.
            attn = self.attn(
                normed,
                value=self.feat_norm(feat),
                identity=normed.new_zeros(()),
                reference_points=reference_points,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
            )
            return self.update(query, attn, *args)

        if self.with_cp and self.training and query.requires_grad:
            return cp.checkpoint(inner, query, feat, use_reentrant=False)
        return inner(query, feat)

    def update(self, query: Tensor, attn: Tensor, *args) -> Tensor:
        """The query after the block, from the attention output."""
        raise NotImplementedError


class Injector(_DeformBlock):
    """``x = x + gamma * DeformAttn(LN(x), LN(c))``: prior -> tokens.

    ``query`` is the backbone tokens (B, K, C), ``feat`` the spatial prior
    (B, N, C) of ``n_levels`` levels.

    Args:
        dims (int): Channels.
        init_values (float): Initial ``gamma``. Defaults to 0.
        n_levels (int): Levels of the spatial prior. Defaults to 3.
        **kwargs: The other arguments of :class:`_DeformBlock`.
    """

    def __init__(
        self,
        dims: int,
        *,
        init_values: float = 0.0,
        n_levels: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(dims, n_levels=n_levels, **kwargs)
        self.gamma = nn.Parameter(init_values * torch.ones(dims))

    def update(self, query: Tensor, attn: Tensor) -> Tensor:
        return query + self.gamma * attn


class Extractor(_DeformBlock):
    """``c = c + DeformAttn(LN(c), LN(x))``, then ``c = c + ConvFFN(LN(c))``.

    ``query`` is the spatial prior (B, N, C), ``feat`` the backbone tokens
    on the full grid (B, h*w, C); ``forward`` takes one more argument,
    ``query_shapes`` (the (h, w) of each level of the prior, for the
    ConvFFN).

    Args:
        dims (int): Channels.
        with_cffn (bool): Add the ConvFFN. Defaults to True.
        cffn_ratio (float): Hidden ratio of the ConvFFN. Defaults to 0.25.
        drop_path (float): Drop-path probability of the ConvFFN.
            Defaults to 0.
        **kwargs: The other arguments of :class:`_DeformBlock`
            (``n_levels`` defaults to 1, the backbone's one grid).
    """

    def __init__(
        self,
        dims: int,
        *,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        drop_path: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(dims, **kwargs)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dims, int(dims * cffn_ratio))
            self.ffn_norm = build_norm(self.layer_norm_cfg, dims)
            self.drop_path = _build_drop_path(drop_path)

    def update(
        self, query: Tensor, attn: Tensor, query_shapes: Shapes
    ) -> Tensor:
        query = query + attn
        if self.with_cffn:
            query = query + self.drop_path(
                self.ffn(self.ffn_norm(query), query_shapes)
            )
        return query


class InteractionBlock(nn.Module):
    """The adapter modules around one group of backbone layers.

    An injector before the group, an extractor after it and, in the last
    interaction of the original model, two extra extractors. The adapter
    (:class:`mmssm.models.backbones.ViTAdapter`) runs the backbone layers in
    between.

    Args:
        dims (int): Channels.
        num_heads (int): Deformable-attention heads. Defaults to 6.
        n_points (int): Sampling points. Defaults to 4.
        init_values (float): Initial ``gamma`` of the injector.
            Defaults to 0.
        deform_ratio (float): Value-projection ratio. Defaults to 1.0.
        with_cffn (bool): ConvFFN in the extractors. Defaults to True.
        cffn_ratio (float): Hidden ratio of the ConvFFN. Defaults to 0.25.
        drop_path (float): Drop path of the ConvFFNs. Defaults to 0.
        extra_extractor (bool): Add two extra extractors.
            Defaults to False.
        layer_norm_cfg (dict, optional): The LayerNorms; None is
            ``dict(type='LN', eps=1e-6)``. Defaults to None.
        with_cp (bool): Checkpoint the blocks. Defaults to False.
    """

    def __init__(
        self,
        dims: int,
        num_heads: int = 6,
        n_points: int = 4,
        init_values: float = 0.0,
        deform_ratio: float = 1.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        drop_path: float = 0.0,
        extra_extractor: bool = False,
        layer_norm_cfg: Optional[dict] = None,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        common = dict(
            num_heads=num_heads,
            n_points=n_points,
            deform_ratio=deform_ratio,
            layer_norm_cfg=layer_norm_cfg,
            with_cp=with_cp,
        )
        self.injector = Injector(
            dims, init_values=init_values, n_levels=3, **common
        )
        extractor_cfg = dict(
            common,
            n_levels=1,
            with_cffn=with_cffn,
            cffn_ratio=cffn_ratio,
            drop_path=drop_path,
        )
        self.extractor = Extractor(dims, **extractor_cfg)
        if extra_extractor:
            self.extra_extractors = nn.Sequential(
                *[Extractor(dims, **extractor_cfg) for _ in range(2)]
            )
        else:
            self.extra_extractors = None

    def extract(
        self,
        c: Tensor,
        reference_points: Tensor,
        feat: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        query_shapes: Shapes,
    ) -> Tensor:
        """The extractor, then the extra extractors if any.

        Args: as :meth:`Extractor.forward`.

        Returns:
            Tensor: The updated prior (B, N, C).
        """
        extractors = [self.extractor]
        if self.extra_extractors is not None:
            extractors += list(self.extra_extractors)
        for extractor in extractors:
            c = extractor(
                c,
                reference_points,
                feat,
                spatial_shapes,
                level_start_index,
                query_shapes,
            )
        return c
