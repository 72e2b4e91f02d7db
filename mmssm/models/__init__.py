from .backbones import *  # noqa: F401,F403
from .classifiers import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .pruning import *  # noqa: F401,F403
