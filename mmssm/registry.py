"""mmssm's registries: children of mmengine's, under the scope ``mmssm``.

Configs of mmdet or mmseg keep their default scope and name our modules with
the scope prefix, e.g. ``type='mmssm.PlainMamba'``.
"""

from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import (
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
)
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='mmssm', locations=['mmssm.models']
)
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor',
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope='mmssm',
    locations=['mmssm.engine'],
)
TRANSFORMS = Registry(
    'transform',
    parent=MMENGINE_TRANSFORMS,
    scope='mmssm',
    locations=['mmssm.datasets.transforms'],
)
# Token scorers of the token pruner: 'clip' (the paper's), 'l1', 'l2',
# 'raw', and the reference selections 'random' and 'given'.
TOKEN_SCORERS = Registry(
    'token scorer', scope='mmssm', locations=['mmssm.models.pruning']
)
HOOKS = Registry(
    'hook', parent=MMENGINE_HOOKS, scope='mmssm', locations=['mmssm.engine']
)
# mmssm.Runner: mmengine's Runner with the reliability hooks (configs'
# runner_type, set by configs/_base_/default_runtime_*.py)
RUNNERS = Registry(
    'runner',
    parent=MMENGINE_RUNNERS,
    scope='mmssm',
    locations=['mmssm.engine'],
)
