"""Key maps from official checkpoints to mmssm's models.

Each ``convert_<src>(state_dict)`` is pure: it takes the official checkpoint
(or its state dict), returns a new state dict for the mmssm model and raises
``KeyError`` listing every key it cannot map (never a silent skip). The
tools in ``tools/model_converters/`` wrap them with :func:`convert_file`.
"""

import argparse
import os
import os.path as osp
import re
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mmssm.errors import UserError
from mmssm.utils.checkpoint import read_checkpoint, sha256sum
from mmssm.utils.fileio import atomic_open
from mmssm.version import __version__

Rule = Tuple[str, str]  # (full-match regex, replacement template)

_NORM_PARAMS = r'(weight|bias|running_mean|running_var|num_batches_tracked)'


def unwrap_state_dict(
    checkpoint: Mapping, wrappers: Sequence[str] = ('state_dict', 'model')
) -> Dict[str, Tensor]:
    """The state dict inside a checkpoint.

    Args:
        checkpoint (Mapping): A loaded checkpoint, or a state dict.
        wrappers (Sequence[str]): Keys under which a state dict may be
            wrapped, tried in order. Defaults to ('state_dict', 'model').

    Returns:
        dict[str, Tensor]: The state dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f'a checkpoint must be a mapping, got {type(checkpoint).__name__}'
        )
    for key in wrappers:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return dict(inner)
    return dict(checkpoint)


def convert_by_rules(
    state_dict: Mapping[str, Tensor],
    rules: Iterable[Rule],
    drop: Iterable[str] = (),
    source: str = 'checkpoint',
) -> Dict[str, Tensor]:
    """Rename keys by the first rule whose regex matches the whole key.

    Args:
        state_dict (Mapping[str, Tensor]): The source state dict.
        rules (Iterable[tuple[str, str]]): ``(pattern, replacement)``; the
            replacement may use the groups of the pattern (``re.sub``
            syntax).
        drop (Iterable[str]): Patterns of keys to leave out on purpose.
            Defaults to ().
        source (str): Name of the source in error messages.
            Defaults to 'checkpoint'.

    Returns:
        dict[str, Tensor]: The renamed state dict.

    Raises:
        KeyError: Listing the keys that no rule and no drop pattern
            matches, or the keys that two sources map to.
    """
    rules = [(re.compile(p), r) for p, r in rules]
    drop = [re.compile(p) for p in drop]
    out: Dict[str, Tensor] = {}
    origin: Dict[str, str] = {}
    unmapped, clashes = [], []
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in drop):
            continue
        for pattern, repl in rules:
            match = pattern.fullmatch(key)
            if match:
                new_key = match.expand(repl)
                if new_key in out:
                    clashes.append(f'{origin[new_key]} and {key} -> {new_key}')
                out[new_key] = value
                origin[new_key] = key
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyError(
            f'{len(unmapped)} key(s) of the {source} cannot be '
            f'mapped: {unmapped}'
        )
    if clashes:
        raise KeyError(f'keys of the {source} clash: {clashes}')
    return out


# --------------------------------------------------------------------------
# PlainMamba (ChenhongyiYang/PlainMamba, mmcls 0.x checkpoints)
# --------------------------------------------------------------------------
_PLAINMAMBA_BACKBONE = (
    rf'patch_embed\.(stem|convs)\.\d+\.{_NORM_PARAMS}',
    r'patch_embed\.projection\.(weight|bias)',
    r'pos_embed',
    r'layers\.\d+\.norm\.(weight|bias)',
    r'layers\.\d+\.mamba\.(in_proj|conv2d|x_proj|dt_proj|out_proj)\.'
    r'(weight|bias)',
    r'layers\.\d+\.mamba\.(A_log|D|direction_Bs)',
    rf'layers\.\d+\.dw\.\d+\.{_NORM_PARAMS}',
    r'ln1\.(weight|bias)',
    r'norm_layer\d+\.(weight|bias)',  # the segmentation backbone's
)
PLAINMAMBA_RULES = [
    (rf'(backbone\.(?:{p}))', r'\1') for p in _PLAINMAMBA_BACKBONE
]
PLAINMAMBA_RULES.append((r'(head\.fc\.(?:weight|bias))', r'\1'))


def convert_plainmamba(
    state_dict: Mapping, extra_drop: Optional[Iterable[str]] = None
) -> Dict[str, Tensor]:
    """Convert an official PlainMamba ImageNet checkpoint.

    The official keys (``backbone.*``, ``head.fc.*``) are already those of
    mmpretrain's ``ImageClassifier`` with a PlainMamba backbone and a
    ``LinearClsHead`` (``configs/plainmamba``); the
    conversion unwraps the checkpoint, validates every key and drops the
    EMA hook's buffers (``ema_*``: the hook swaps the averaged weights into
    the parameters before saving, so the parameters are the weights to keep).

    Args:
        state_dict (Mapping): The checkpoint, possibly wrapped in
            ``state_dict`` or ``model``.
        extra_drop (Iterable[str], optional): More patterns of keys to drop.
            Defaults to None.

    Returns:
        dict[str, Tensor]: ``backbone.*`` and ``head.fc.*`` keys.

    Raises:
        KeyError: Listing the keys that cannot be mapped.
    """
    state_dict = unwrap_state_dict(state_dict)
    drop = [r'ema_.*', *(extra_drop or ())]
    return convert_by_rules(
        state_dict, PLAINMAMBA_RULES, drop=drop, source='PlainMamba checkpoint'
    )


# --------------------------------------------------------------------------
# Vim (hustvl/Vim, DeiT-style checkpoints ``{'model': ..., 'model_ema': ...}``)
# --------------------------------------------------------------------------
_VIM_MIXER = (
    r'in_proj\.(weight|bias)',
    r'conv1d(_b)?\.(weight|bias)',
    r'x_proj(_b)?\.weight',
    r'dt_proj(_b)?\.(weight|bias)',
    r'(A_log|A_b_log|D|D_b)',
    r'out_proj\.(weight|bias)',
)
_VIM_BACKBONE = (
    r'patch_embed\.proj\.(weight|bias)',
    r'cls_token',
    r'pos_embed',
    r'layers\.\d+\.norm\.(weight|bias)',
    *(rf'layers\.\d+\.mixer\.{p}' for p in _VIM_MIXER),
    r'norm_f\.(weight|bias)',
)
VIM_RULES = [(rf'({p})', r'backbone.\1') for p in _VIM_BACKBONE]
VIM_RULES.append((r'head\.(weight|bias)', r'head.fc.\1'))
# EMA copies, if a checkpoint was flattened (DeiT keeps them under the
# separate top-level key 'model_ema', which unwrapping leaves out).
_VIM_EMA = (r'ema_.*', r'model_ema\..*')


def drop_middle_class_slot(pos_embed: Tensor) -> Tensor:
    """``pos_embed`` (1, M + 1, C) without its class slot at ``M // 2``.

    Vim inserts its class token at index ``M // 2`` of the M patch tokens,
    so the class slot of ``pos_embed`` is there (not at 0).
    """
    mid = (pos_embed.shape[1] - 1) // 2
    return torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1 :]], dim=1)


def convert_vim(state_dict: Mapping, dense: bool = True) -> Dict[str, Tensor]:
    """Convert an official Vim ImageNet checkpoint.

    Two targets:

    * ``dense=False``: mmpretrain's ``ImageClassifier`` with a ``Vim``
      backbone keeping its middle class token (``cls_token='middle'``,
      ``out_type='cls_token'``) and a ``LinearClsHead`` (``configs/vim``):
      every key is kept, ``pos_embed`` whole (with its class slot at
      ``M // 2``), ``head.*`` becomes ``head.fc.*``.
    * ``dense=True``: a detection/segmentation backbone built with
      ``cls_token=None, final_norm=False`` (features are the token stream;
      the released detection code taps it without ``norm_f`` too): the class
      slot at ``M // 2`` is taken out of ``pos_embed``, and ``cls_token``,
      ``norm_f.*`` and ``head.*`` are dropped. Load it with
      ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``;
      the backbone resizes ``pos_embed`` to its grid on load.

    EMA entries are dropped. Keys come out as ``backbone.*`` (and
    ``head.fc.*``).

    Args:
        state_dict (Mapping): The checkpoint ``{'model': ...}`` or the bare
            state dict.
        dense (bool): Convert for dense prediction (see above).
            Defaults to True.

    Returns:
        dict[str, Tensor]: The converted state dict.

    Raises:
        KeyError: Listing the keys that cannot be mapped (e.g. the ``rope.*``
            buffers or ``mixer.gamma`` of variants this backbone lacks).
    """
    state_dict = unwrap_state_dict(state_dict, wrappers=('model',))
    drop = list(_VIM_EMA)
    if dense:
        drop += [r'cls_token', r'norm_f\..*', r'head\..*']
        if 'cls_token' in state_dict and 'pos_embed' in state_dict:
            state_dict['pos_embed'] = drop_middle_class_slot(
                state_dict['pos_embed']
            )
    return convert_by_rules(
        state_dict, VIM_RULES, drop=drop, source='Vim checkpoint'
    )


# --------------------------------------------------------------------------
# Files: what the tools in tools/model_converters/ share
# --------------------------------------------------------------------------
def converter_parser(description: str) -> argparse.ArgumentParser:
    """The command line of a converter: ``src`` and ``dst``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('src', help='the official checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the mmssm checkpoint')
    return parser


def save_atomic(obj: dict, dst: str) -> None:
    """``torch.save`` to a temporary file next to ``dst``, then rename."""
    folder = osp.dirname(osp.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    with atomic_open(dst) as f:  # mmssm.utils.fileio: whole or not at all
        torch.save(obj, f)


def convert_file(
    src: str,
    dst: str,
    convert: Callable[[Mapping], Dict[str, Tensor]],
    source: str,
    converter: str,
    meta: Optional[dict] = None,
    safe_globals: Sequence = (),
) -> None:
    """Convert the checkpoint file ``src`` into ``dst``, for a tool.

    ``src`` is loaded with ``weights_only=True``; ``dst`` holds
    ``state_dict`` and ``meta`` (the converter, mmssm's version, the source
    file's name and SHA-256, then ``meta``) and is written atomically.
    A problem with the files raises :class:`~mmssm.errors.UserError`.

    Args:
        src (str): The official checkpoint.
        dst (str): The mmssm checkpoint to write.
        convert (Callable): Returns the state dict of a loaded checkpoint;
            raises ``KeyError`` or ``TypeError`` if it cannot.
        source (str): The kind of checkpoint, for error messages
            ('PlainMamba', 'Vim').
        converter (str): The tool's name, for ``meta``.
        meta (dict, optional): More ``meta``. Defaults to None.
        safe_globals (Sequence): Globals to allow-list while loading
            ``src``. Defaults to ().

    Raises:
        UserError: If ``src`` is missing, cannot be loaded or converted, or
            ``dst`` cannot be written.
    """
    with torch.serialization.safe_globals(list(safe_globals)):
        checkpoint = read_checkpoint(src)  # one-line errors, weights only
    try:
        state_dict = convert(checkpoint)
    except (KeyError, TypeError) as e:
        raise UserError(
            f'{src} is not a {source} checkpoint that can be converted: {e}'
        ) from None
    meta = dict(
        converter=converter,
        mmssm_version=__version__,
        source=osp.basename(src),
        source_sha256=sha256sum(src),
        **(meta or {}),
    )
    try:
        save_atomic(dict(state_dict=state_dict, meta=meta), dst)
    except OSError as e:
        raise UserError(f'cannot write {dst}: {e}') from None
    print(f'{src} -> {dst}: {len(state_dict)} tensors')
