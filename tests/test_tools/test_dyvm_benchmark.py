"""The DyVM rows of tools/analysis_tools/benchmark.py: what each row
builds, and the direction budget of random-weight gates."""

import pytest
import torch

from mmssm.models.backbones import PlainMamba, Vim
from mmssm.testing import tiny_arch
from mmssm.utils.flops import measure_direction_keep


@pytest.fixture(scope='module')
def bench(tools):
    return tools.load_script('tools/analysis_tools/benchmark.py')


def test_dyvm_rows(bench):
    rows = bench.select_rows(['dyvm-vim-s-224'], None)
    names = [r.key.split('224-')[1] for r in rows]
    assert names == [
        'dense',
        'tokens',
        'dirs',
        'both',
        'tokens-align',
        'both-align',
    ]
    by_name = dict(zip(names, rows))
    assert all(r.baseline == rows[0].key for r in rows[1:])
    assert by_name['dirs'].direction_keep == 0.8
    assert by_name['tokens'].direction_keep is None
    # one process per model group when interleaved
    assert len(bench.interleave_groups(rows)) == 1
    prune = by_name['both-align'].backbone['prune_cfg']
    assert prune['align'] is True and prune['schedule'] == 'dyvm'


@pytest.mark.parametrize(
    'cls, family', [(Vim, 'vim'), (PlainMamba, 'plainmamba')]
)
def test_direction_budget_of_random_gates(bench, cls, family):
    torch.manual_seed(0)
    model = cls(
        arch=tiny_arch(family, num_layers=8),
        img_size=64,
        direction_gate=True,
    ).eval()
    x = torch.randn(16, 3, 64, 64)
    bench.set_direction_budget(model, x, 0.8)
    keep = measure_direction_keep(model, [x])
    assert 0.7 <= keep <= 0.9
    # images differ: some image runs a direction that another skips
    gates = model.aux_outputs['direction_gates']
    assert any(
        0 < float(g[:, d].mean()) < 1 for g in gates for d in range(g.shape[1])
    )
    with pytest.raises(Exception, match='direction_gate=True'):
        bench.set_direction_budget(
            cls(arch=tiny_arch(family), img_size=64), x, 0.8
        )
