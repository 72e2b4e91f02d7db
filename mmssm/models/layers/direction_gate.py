"""DyVM's per-image scan-direction selection (arXiv 2504.04787).

A :class:`DirectionGate` decides, per layer, per image and per scan
direction, whether the direction runs. The mixers (Vim's
:class:`~mmssm.models.backbones.vim.BiMambaV2`, PlainMamba's
:class:`~mmssm.models.backbones.plainmamba.PlainMambaMixer`) build one with
``direction_gate=True`` and apply its bits: in training each direction's
gated SSM output is multiplied by its (straight-through) bit, at inference
a direction only runs on the images whose bit is on.
"""

from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Union,
)

import torch
import torch.nn as nn
from torch import Tensor

from mmssm.errors import UserError
from mmssm.ops.checks import empty_layout, tokens_major
from mmssm.registry import MODELS


@MODELS.register_module()
class DirectionGate(nn.Module):
    """DyVM's gate head: one on/off bit per scan direction and image.

    ``Linear(2 * d_inner, num_directions)`` on the mixer's ``in_proj``
    output ``x || z`` pooled per image: at the class token, or, without
    one, the mean over the kept tokens (``token_mask``-weighted when the
    sequence is masked, which equals the plain mean over the tokens of a
    pruned sequence). Training: a hard Gumbel-sigmoid, ``1[(l + g) / tau >
    0]`` with ``g`` logistic noise (so ``P(on) = sigmoid(l)``; threshold 0.5
    on ``sigmoid((l + g) / tau)``), straight through the soft value.
    Evaluation: ``1[l > threshold_logit]``, the threshold calibratable (the
    released gates keep more directions at eval than their target).

    Args:
        in_dims (int): Channels of ``x || z`` (2 * d_inner).
        num_directions (int): Scan directions (Vim 2, PlainMamba 4).
        tau (float): Gumbel-sigmoid temperature. Defaults to 2.0.
        threshold_logit (float): Eval threshold on the logit.
            Defaults to 0.0.
        init_bias (float): Initial bias (weight 0): every direction starts
            on. Defaults to 5.0.
    """

    def __init__(
        self,
        in_dims: int,
        num_directions: int,
        tau: float = 2.0,
        threshold_logit: float = 0.0,
        init_bias: float = 5.0,
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise UserError(f'tau must be positive, got {tau}')
        self.num_directions = num_directions
        self.tau = tau
        self.threshold_logit = float(threshold_logit)
        self.fc = nn.Linear(in_dims, num_directions)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, init_bias)

    @staticmethod
    def pool(
        xz: Tensor,
        cls_index: Union[None, int, Tensor] = None,
        token_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """One (B, 2E) vector per image from ``xz`` (B, K, 2E).

        Args:
            xz (Tensor): The ``in_proj`` output, tokens on dim 1.
            cls_index (int | Tensor, optional): The class token's index in
                the K tokens, one for all images or (B,) int64 per image.
                None: the mean over the (kept) tokens. Defaults to None.
            token_mask (Tensor, optional): (B, K) {0, 1}: the kept tokens of
                a masked sequence. Defaults to None (all kept).
        """
        if cls_index is not None:
            if isinstance(cls_index, Tensor):
                index = cls_index.view(-1, 1, 1).expand(-1, 1, xz.shape[-1])
                return xz.gather(1, index)[:, 0]
            return xz[:, int(cls_index)]
        if token_mask is None:
            return xz.mean(dim=1)
        weight = token_mask.to(xz.dtype)[..., None]
        return (xz * weight).sum(1) / weight.sum(1).clamp_min(1)

    def forward(
        self,
        xz: Tensor,
        cls_index: Union[None, int, Tensor] = None,
        token_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """The bits of each image's directions.

        Args:
            xz (Tensor): (B, K, 2E), see :meth:`pool`.
            cls_index (int | Tensor, optional): See :meth:`pool`.
            token_mask (Tensor, optional): See :meth:`pool`.

        Returns:
            Tensor: (B, num_directions) in ``xz``'s dtype, of 0 and 1:
            straight-through (differentiable) in training, constant at eval.
        """
        logits = self.fc(self.pool(xz, cls_index, token_mask))
        if not self.training:
            return (logits > self.threshold_logit).to(logits.dtype)
        # logistic noise: the difference of two Gumbels
        uniform = torch.rand_like(logits).clamp(1e-10, 1 - 1e-10)
        noise = torch.log(uniform) - torch.log1p(-uniform)
        soft = torch.sigmoid((logits + noise) / self.tau)
        hard = (soft > 0.5).to(soft.dtype)
        return hard - soft.detach() + soft

    def extra_repr(self) -> str:
        return (
            f'num_directions={self.num_directions}, tau={self.tau}, '
            f'threshold_logit={self.threshold_logit}'
        )


def build_direction_gate(
    cfg: Union[bool, dict, None], in_dims: int, num_directions: int
) -> Optional[DirectionGate]:
    """The mixers' gate from their ``direction_gate`` argument.

    Args:
        cfg (bool | dict | None): False/None: no gate; True: the default
            gate; a dict: keyword arguments of :class:`DirectionGate`
            (``tau``, ``threshold_logit``, ``init_bias``).
        in_dims (int): Channels of ``x || z``.
        num_directions (int): Scan directions of the mixer.
    """
    if cfg is None or cfg is False:
        return None
    if cfg is True:
        cfg = {}
    if not isinstance(cfg, dict):
        raise UserError(
            f'direction_gate must be a bool or a dict, got {cfg!r}'
        )
    return DirectionGate(in_dims, num_directions, **cfg)


def record_gates(aux: Optional[dict], bits: Tensor) -> None:
    """Append a layer's (B, n_dir) decisions to ``aux['direction_gates']``
    (the aux channel of the backbone's forward), if ``aux`` is given.

    Not while autograd runs a backward pass: that is the recomputation of a
    checkpointed layer (``with_cp``), whose decisions the forward already
    recorded (the same bits: the checkpoint restores the RNG state).
    """
    if aux is not None and not _in_backward():
        aux.setdefault('direction_gates', []).append(bits)


def _in_backward() -> bool:
    """Whether this code runs inside autograd's backward pass."""
    return torch._C._current_graph_task_id() != -1


def add_gated(
    total: Optional[Tensor],
    run: Callable[[Optional[Tensor]], Tensor],
    bits: Optional[Tensor],
    training: bool,
    like: Tensor,
) -> Tensor:
    """``total`` plus one direction's output, gated by its bits.

    Without bits the whole output is added; in training all of it times
    the (straight-through) bits; at inference only the rows whose bit is
    on are computed and added at their rows (in place when autograd does
    not record), so the skipped compute is really skipped, with no copy of
    the output and no full-size sum.

    Args:
        total (Tensor, optional): The sum of the directions so far
            (``like``'s shape), or None before the first one. Added to in
            place at inference without autograd.
        run (Callable): ``run(index)`` computes the rows ``index`` (int64,
            sorted) of the direction's output, or all of them for None.
        bits (Tensor, optional): (R, ) of 0/1 (or bool), the direction's
            bit per row; None: no gate.
        training (bool): Whether the gate trains (multiply by the bits).
        like (Tensor): The output's shape, dtype, device and layout (the
            zeros when the first direction skips rows).

    Returns:
        Tensor: ``total`` plus the gated output.
    """
    if bits is None:
        out = run(None)
    elif training:
        out = run(None) * bits.reshape(-1, 1, 1).to(like.dtype)
    else:
        index = _selected_rows(bits)
        if index is not None:
            if total is None:
                total = empty_layout(like).zero_()
            if index.numel():
                total = _index_add_rows(total, index, run(index))
            return total
        out = run(None)
    return out if total is None else total + out


def _selected_rows(bits: Tensor) -> Optional[Tensor]:
    """The rows whose bit is on (int64, sorted), or None for all of them."""
    if bits.device.type == 'meta':
        # shapes only (FLOP counting with every gate on): no bits to read
        return None
    index = bits.nonzero()[:, 0]
    return None if index.numel() == bits.numel() else index


def _index_add_rows(total: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """``total`` plus ``rows`` at the rows ``index``: in place, except
    while autograd records (it forbids modifying a custom op's output
    view in place). Tokens-major tensors (the kernels' outputs) are added
    as their contiguous (R, K, C) views: ``index_add_`` on the (R, C, K)
    views is over 10 times slower."""
    transposed = tokens_major(total) and tokens_major(rows)
    if transposed:
        total, rows = total.transpose(1, 2), rows.transpose(1, 2)
    if torch.is_grad_enabled():
        total = total.index_add(0, index, rows)
    else:
        total.index_add_(0, index, rows)
    return total.transpose(1, 2) if transposed else total


def select_rows(t: Optional[Tensor], index: Tensor) -> Optional[Tensor]:
    """Rows ``index`` (dim 0) of ``t``, in its layout: a (B, C, K) view of
    a (B, K, C) tensor (a projection's output) gives one again, which the
    kernels read without a copy (``index_select`` of the view itself would
    give a contiguous (B, C, K) tensor, read with strided loads).

    Args:
        t (Tensor, optional): Any tensor with the rows in dim 0, or None.
        index (Tensor): int64 (R, ), the rows.

    Returns:
        Tensor | None: (R, ...), or None for None.
    """
    if t is None:
        return None
    if tokens_major(t):
        return t.transpose(1, 2).index_select(0, index).transpose(1, 2)
    return t.index_select(0, index)


def _collect_gate_logits(
    model: nn.Module,
    gates: Sequence[DirectionGate],
    batches: Sequence[Any],
    forward: Optional[Callable[[nn.Module, Any], Any]],
) -> List[Tensor]:
    """Every gate's logits over the batches, one (N_g, n_dir) per gate.

    A forward hook on each gate's ``fc`` reads the logits the gate thresholds
    (the mixers are not touched); the model runs in eval mode without
    gradient.
    """
    found: List[List[Tensor]] = [[] for _ in gates]

    def hook_of(i: int) -> Callable:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            found[i].append(out.detach().reshape(-1, out.shape[-1]))

        return hook

    handles = [
        gate.fc.register_forward_hook(hook_of(i))
        for i, gate in enumerate(gates)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch) if forward else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return [
        torch.cat(logits) if logits else torch.empty(0) for logits in found
    ]


def _keep_of(logits: Sequence[Tensor], thresholds: Sequence[float]) -> float:
    """The fraction of the bits that are on, each gate at its threshold."""
    kept = sum(int((lg > t).sum()) for lg, t in zip(logits, thresholds))
    total = sum(lg.numel() for lg in logits)
    return kept / total


def _quantile_threshold(logits: Tensor, target: float) -> float:
    """The threshold ``T`` with about ``target * N`` of ``logits > T``.

    Equal logits are kept or dropped together (Vim's first layer reads its
    class token before any image content enters it: its logits are the
    same for every image), so the cut goes at the boundary between distinct
    values nearest to ``round(target * N)``: the midpoint of the last kept
    and the first dropped value (a small drift of the logits does not flip
    a bit); below the smallest value when all are kept.
    """
    ordered = logits.flatten().sort(descending=True).values
    n = ordered.numel()
    want = max(1, min(n, round(target * n)))
    # cut j keeps ordered[:j]: possible where the value changes, and at n
    cuts = (ordered[:-1] > ordered[1:]).nonzero()[:, 0] + 1
    cuts = torch.cat([cuts, cuts.new_tensor([n])])
    k = int(cuts[(cuts - want).abs().argmin()])
    last_on = ordered[k - 1]
    if k == n:
        return float(last_on) - 1.0
    first_off = ordered[k]
    threshold = (last_on + first_off) / 2
    if threshold >= last_on:  # adjacent floats: the midpoint rounds up
        threshold = first_off
    return float(threshold)


def calibrate_direction_gates(
    model: nn.Module,
    batches: Iterable[Any],
    target: float,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    max_passes: int = 8,
) -> Dict[str, Any]:
    """Set the eval threshold of every direction gate to a direction budget.

    The training loss pulls the mean of all gate bits towards its target,
    but the eval decision ``logit > threshold_logit`` (threshold 0 by
    default) keeps more (DyVM's released gates: about 0.89 for 0.8). This
    sets ONE threshold shared by all the model's gates (the budget is global,
    as the loss's mean) so that the fraction of the (image, layer, direction)
    bits that are on over ``batches`` equals ``target``: the quantile of all
    the gates' logits. A gate's bits change what the later layers see, and
    so their logits: the model is run again with the new threshold and the
    quantile is taken again, until the measured keep is within one bit's
    share (1 / number of bits) of ``target`` or after ``max_passes``; the
    threshold whose measured keep came closest is kept. Equal logits share
    their bit (e.g. Vim's first layer, whose class token carries no image
    yet, decides the same for every image): the cut falls between distinct
    values, so the keep can miss the target by up to such a group's share.

    Args:
        model (nn.Module): A model whose mixers have direction gates (built
            with ``direction_gate``); run in eval mode without gradient (its
            mode is restored). Its gates' ``threshold_logit`` is set.
        batches (Iterable): Inputs, one per forward; read once per pass (a
            one-shot iterator is read into a list first).
        target (float): The kept fraction of the directions, in (0, 1].
        forward (Callable, optional): ``forward(model, batch)``; None:
            ``model(batch)``. Defaults to None.
        max_passes (int): The most forward passes after the first one.
            Defaults to 8.

    Returns:
        dict: ``keep_before`` (the kept fraction at the gates' thresholds
        before, measured on ``batches``), ``keep_after`` (at the new
        threshold, measured by a run with it), ``threshold_logit`` (the
        threshold set), ``target``, ``num_bits`` (images * layers *
        directions) and ``passes`` (the forward passes after the first).

    Raises:
        UserError: If ``target`` is not in (0, 1], the model has no
            direction gates, or ``batches`` gives none of their bits.
    """
    if not 0 < target <= 1:
        raise UserError(
            f'target (the kept fraction of the directions) must be in '
            f'(0, 1], got {target}'
        )
    gates = [m for m in model.modules() if isinstance(m, DirectionGate)]
    if not gates:
        raise UserError(
            f'{type(model).__name__} has no direction gates to calibrate: '
            'build its backbone with direction_gate=True'
        )
    if not isinstance(batches, Sequence):
        batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        before = [gate.threshold_logit for gate in gates]
        logits = _collect_gate_logits(model, gates, batches, forward)
        num_bits = sum(lg.numel() for lg in logits)
        if not num_bits:
            raise UserError(
                'the batches ran none of the direction gates: give at least '
                'one batch the model runs'
            )
        keep_before = _keep_of(logits, before)
        best = None
        passes = 0
        while passes < max_passes:
            passes += 1
            threshold = _quantile_threshold(
                torch.cat([lg.flatten() for lg in logits]), target
            )
            for gate in gates:
                gate.threshold_logit = threshold
            logits = _collect_gate_logits(model, gates, batches, forward)
            keep = _keep_of(logits, [threshold] * len(gates))
            if best is None or abs(keep - target) < abs(best[1] - target):
                best = (threshold, keep)
            if abs(keep - target) <= 1 / num_bits:
                break
        threshold, keep_after = best
        for gate in gates:
            gate.threshold_logit = threshold
    finally:
        model.train(was_training)
    return dict(
        keep_before=keep_before,
        keep_after=keep_after,
        threshold_logit=threshold,
        target=float(target),
        num_bits=num_bits,
        passes=passes,
    )
