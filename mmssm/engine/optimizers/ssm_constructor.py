"""An optimizer wrapper constructor that knows which SSM parameters to spare.

Weight decay must not shrink a state-space model's ``A_log`` (that would
push every decay rate towards 1), its skip ``D``, PlainMamba's
``direction_Bs``, the position and level embeddings, norms or biases.
Selecting them with mmengine's substring ``custom_keys`` is fragile: a key
``'.D'`` also matches ``'.D_b'`` or ``'.Downsample'``, and ``'norm'`` misses
PlainMamba's ``ln1`` and the batch norms of its stem (``patch_embed.stem.1``).
The backbones therefore tag such parameters themselves
(``param._no_weight_decay = True``), and this constructor honours the tags.
"""

import logging
from typing import List, Optional, Tuple, Union

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from mmssm.registry import OPTIM_WRAPPER_CONSTRUCTORS

_NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def is_norm(module: nn.Module) -> bool:
    """Whether a module is a normalisation layer.

    mmengine's types (batch, instance, group and layer norms) and any class
    whose name ends with ``Norm`` (e.g. Vim's ``RMSNorm``).
    """
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith('Norm')


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class SSMOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """:class:`DefaultOptimWrapperConstructor` plus exact no-decay rules.

    Everything ``paramwise_cfg`` does in mmengine still applies
    (``custom_keys``, ``norm_decay_mult``, ``bias_decay_mult``, ...), with
    ``norm_decay_mult`` extended to every class whose name ends with
    ``Norm`` (mmengine only knows its own norm types). On top of that a
    parameter gets ``weight_decay=0`` when

    * it carries ``_no_weight_decay = True`` (set by the backbones on
      ``A_log``, ``D``, ``direction_Bs``, ``pos_embed``, ``cls_token``, ...),
      unless ``paramwise_cfg['honour_no_decay_flags']`` is False; or
    * its own name (the last component of its dotted name, compared
      exactly) is in ``paramwise_cfg['no_decay_names']``: ``'D'`` matches
      ``layers.0.mixer.D`` but neither ``D_b`` nor ``Downsample.weight``.

    A ``custom_keys`` entry that matches the parameter and sets
    ``decay_mult`` explicitly wins over both rules.

    Example::

        optim_wrapper = dict(
            type='OptimWrapper',
            constructor='mmssm.SSMOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
            paramwise_cfg=dict(
                norm_decay_mult=0.0,
                bias_decay_mult=0.0,
                no_decay_names=('level_embed', 'pos_embed')))

    Args:
        optim_wrapper_cfg (dict): The optimizer wrapper config, with
            ``optimizer``.
        paramwise_cfg (dict, optional): As mmengine's, plus
            ``no_decay_names`` (Sequence[str], default ``()``) and
            ``honour_no_decay_flags`` (bool, default True).
            Defaults to None.
    """

    def __init__(
        self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None
    ) -> None:
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        names = self.paramwise_cfg.get('no_decay_names', ())
        if isinstance(names, str) or not all(
            isinstance(n, str) for n in names
        ):
            raise TypeError(
                'paramwise_cfg.no_decay_names must be a sequence of '
                f'parameter names, got {names!r}'
            )
        for name in names:
            if not name or '.' in name:
                raise ValueError(
                    'paramwise_cfg.no_decay_names holds the last component '
                    f'of parameter names (e.g. "A_log"), got {name!r}'
                )
        self.no_decay_names = frozenset(names)
        self.honour_flags = bool(
            self.paramwise_cfg.get('honour_no_decay_flags', True)
        )

    def _explicit_decay(self, full_name: str) -> bool:
        """Whether a ``custom_keys`` entry sets this parameter's decay."""
        custom_keys = self.paramwise_cfg.get('custom_keys', {})
        for key in sorted(sorted(custom_keys), key=len, reverse=True):
            if key in full_name:  # mmengine's matching rule
                return 'decay_mult' in custom_keys[key]
        return False

    def _decay_mult(
        self, module: nn.Module, name: str, param: nn.Parameter, full_name: str
    ) -> Optional[Tuple[float, str]]:
        """This class's decay multiplier of a parameter and why, or None."""
        if self._explicit_decay(full_name):
            return None
        if self.honour_flags and getattr(param, '_no_weight_decay', False):
            return 0.0, 'flagged _no_weight_decay'
        if name in self.no_decay_names:
            return 0.0, 'in no_decay_names'
        norm_mult = self.paramwise_cfg.get('norm_decay_mult', None)
        if norm_mult is not None and is_norm(module):
            return norm_mult, 'norm'  # incl. norms that mmengine misses
        return None

    def add_params(
        self,
        params: List[dict],
        module: nn.Module,
        prefix: str = '',
        is_dcn_module: Optional[Union[int, float]] = None,
    ) -> None:
        """Add the parameters of ``module`` (and its children) to ``params``.

        mmengine's rules first, then this class's rules on the groups of the
        module's own parameters.
        """
        start = len(params)
        super().add_params(params, module, prefix, is_dcn_module)
        own = {
            id(p): name for name, p in module.named_parameters(recurse=False)
        }
        for group in params[start:]:
            param = group['params'][0]
            name = own.get(id(param))
            if name is None:  # a child's parameter: already handled
                continue
            full_name = f'{prefix}.{name}' if prefix else name
            rule = self._decay_mult(module, name, param, full_name)
            if rule is None:
                continue
            mult, reason = rule
            if mult == 0:  # also when the optimizer's default decay is used
                group['weight_decay'] = 0.0
            elif self.base_wd is not None:
                group['weight_decay'] = self.base_wd * mult
            else:
                continue
            print_log(
                f'paramwise_options -- {full_name}:weight_decay='
                f'{group["weight_decay"]} ({reason})',
                logger='current',
                level=logging.DEBUG,
            )
