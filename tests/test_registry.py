"""mmssm's registries are children of mmengine's, scope ``mmssm``."""

import subprocess
import sys

import pytest
from mmengine.model import BaseModule
from mmengine.registry import DefaultScope

from mmssm.registry import MODELS


@MODELS.register_module(force=True)
class _RegistryProbe(BaseModule):
    def __init__(self, width=3):
        super().__init__()
        self.width = width


@pytest.mark.parametrize('task', ['mmdet', 'mmseg'])
def test_found_from_task_scope(task):
    registry = pytest.importorskip(f'{task}.registry')
    with DefaultScope.overwrite_default_scope(task):
        model = registry.MODELS.build(
            dict(type='mmssm._RegistryProbe', width=5)
        )
    assert isinstance(model, _RegistryProbe) and model.width == 5
    assert MODELS.scope == 'mmssm'
    assert MODELS.parent.scope == 'mmengine'


def test_import_needs_neither_mmdet_nor_mmseg_nor_the_extension():
    code = (
        'import sys\n'
        "for name in ('mmdet', 'mmseg', 'mmssm._ext', 'mmssm._ext_avx2',\n"
        "             'mamba_ssm'):\n"
        '    sys.modules[name] = None  # any import of these fails\n'
        'import mmssm, mmssm.ops, mmssm.models\n'
        'assert mmssm.ops.ext_status().startswith("not built")\n'
        'print("ok")\n'
    )
    out = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'ok'
