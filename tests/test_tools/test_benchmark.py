"""tools/analysis_tools/benchmark.py: row selection, rounds, one real row.

Only the mechanics: the tool's timings are its output, never asserted."""

import json
import os.path as osp

import pytest

from mmssm.errors import UserError

TOOL = osp.join('tools', 'analysis_tools', 'benchmark.py')


@pytest.fixture(scope='module')
def bench(tools):
    return tools.load_script(TOOL)


def _run(ms: float, fwd: float, wall: float = 1.0) -> dict:
    return dict(
        key='r',
        ms_per_iter=ms,
        images_per_s=8e3 / ms,
        peak_fwd_mib=fwd,
        peak_rss_mib=fwd + 500,
        exact_peak=True,
        wall_s=wall,
    )


def test_combine_rounds(bench):
    res = bench.combine_rounds([_run(300, 10), _run(100, 30), _run(200, 20)])
    assert res['ms_per_iter'] == 200
    assert res['images_per_s'] == pytest.approx(8e3 / 200)
    assert res['peak_fwd_mib'] == 30 and res['peak_rss_mib'] == 530
    assert res['wall_s'] == 3.0 and res['rounds_ms'] == [300, 100, 200]
    failed = dict(key='r', error='boom')
    assert bench.combine_rounds([_run(1, 1), failed]) == failed


def test_select_rows(bench):
    rows = bench.select_rows(['prune-vim-s-224'], None)
    assert [r.key.rsplit('-', 1)[1] for r in rows] == [
        'dense',
        'aligned',
        'naive',
    ]
    # the pruned rows are the dense config with the backbone overridden
    assert rows[1].baseline == rows[0].key == rows[2].baseline
    assert rows[1].backbone == dict(prune_cfg='paper')
    assert rows[2].backbone['prune_cfg']['align'] is False
    with pytest.raises(UserError, match='unknown rows'):
        bench.select_rows(['no-such-row'], None)
    with pytest.raises(UserError, match='no row selected'):
        bench.select_rows(['prune-'], ['no-such-impl'])


def test_one_row_two_rounds(tools, tmp_path):
    out = tmp_path / 'bench.json'
    cmd = [
        TOOL,
        '--rows', 'test-tiny-vim-naive',
        '--iters', '1', '--warmup', '0', '--rounds', '2', '--threads', '1',
        '--json', str(out),
    ]  # fmt: skip
    proc = tools.run(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '| tiny Vim paper naive | 64x64 | 2 | cpu |' in proc.stdout
    assert 'rounds 2 (median)' in proc.stdout
    saved = json.loads(out.read_text())
    runs = saved['rounds']['test-tiny-vim-naive']
    assert len(runs) == 2 and all(r['iters'] == 1 for r in runs)
    assert saved['results']['test-tiny-vim-naive']['rounds_ms'] == [
        round(r['ms_per_iter'], 1) for r in runs
    ]
    assert all(r['peak_fwd_mib'] > 0 for r in runs)


def test_interleaved_group(bench, tools, tmp_path):
    """A dense row and its pruned variants in one process, alternating."""
    groups = bench.interleave_groups(bench.select_rows(['prune-'], None))
    assert all(len(g) == 3 and g[0].key.endswith('-dense') for g in groups)
    out = tmp_path / 'bench.json'
    cmd = [
        TOOL,
        '--rows', 'test-tiny-vim', '--interleave',
        '--iters', '2', '--warmup', '0', '--threads', '1',
        '--json', str(out),
    ]  # fmt: skip
    proc = tools.run(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'rounds 1 (median), interleaved' in proc.stdout
    # one process for the three rows (one progress line for the group)
    assert proc.stderr.count(' ...') == 1
    for name in ('dense', 'paper aligned', 'paper naive'):
        assert f'| tiny Vim {name} | 64x64 | 2 | cpu |' in proc.stdout
    assert 'vs dense | - | - |' in proc.stdout  # no memory columns
    results = json.loads(out.read_text())['results']
    assert all(len(r['ms_all']) == 2 for r in results.values())


def test_bad_arguments(tools):
    proc = tools.run([TOOL, '--rounds', '0'])
    assert proc.returncode == 2 and '--rounds' in proc.stderr
    proc = tools.run([TOOL, '--rows', 'no-such-row'])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith('error: unknown')


# --------------------------------------------------------------------------
# The end-to-end rows (issue 13 item 5): Mask R-CNN and UperNet, dense, the
# paper's static pruning, DyVM rearranged and aligned
# --------------------------------------------------------------------------
def test_e2e_rows(bench):
    """``--rows e2e-`` selects the 24 end-to-end rows: each variant is its
    own config (the dense config's ``-prune``, ``-dyvm``, ``-dyvm-align``
    variants), one image per forward; the tiny test rows are the same
    variants."""
    rows = bench.select_rows(['e2e-'], None)
    assert len(rows) == 2 * 3 * 4
    variants = ('dense', 'paper', 'dyvm', 'dyvm-align')
    for prefix, kind, shape in (
        ('e2e-maskrcnn-', 'detector', (800, 1333)),
        ('e2e-upernet-', 'segmentor', (512, 512)),
    ):
        for backbone in ('pm-l1', 'pm-l3', 'vim-s'):
            key = f'{prefix}{backbone}-'
            group = [r for r in rows if r.key.startswith(key)]
            assert [r.key[len(key) :] for r in group] == list(variants)
            dense = group[0]
            assert all(
                r.kind == kind and r.shape == shape and r.batch == 1
                for r in group
            )
            assert dense.baseline is None and dense.direction_keep is None
            assert all(r.baseline == dense.key for r in group[1:])
            fields = ('', '-prune', '-dyvm', '-dyvm-align')
            assert [r.config for r in group] == [
                dense.config.replace('_adapter', f'{f}_adapter')
                for f in fields
            ]
            assert all(
                osp.isfile(osp.join(bench.ROOT, r.config)) for r in group
            )
            # DyVM's gates (random) at the budget their loss trains
            assert [r.direction_keep for r in group] == [None, None, 0.8, 0.8]
            assert not any(r.backbone or r.tiny for r in group)
    tiny = bench.select_rows(['test-tiny-e2e-'], None)
    assert len(tiny) == 8 and all(r.tiny for r in tiny)
    assert {r.key.split('-', 3)[3] for r in tiny} == {
        f'{task}-{v}' for task in ('maskrcnn', 'upernet') for v in variants
    }


@pytest.mark.parametrize(
    'key, sample',
    [
        ('test-tiny-e2e-maskrcnn-dyvm', 'DetDataSample'),
        ('test-tiny-e2e-upernet-dyvm-align', 'SegDataSample'),
    ],
)
def test_e2e_tiny_models(bench, key, sample):
    """A tiny row builds its config's detector / segmentor with the
    config's learned pruner (steps moved into the tiny arch) and runs
    ``predict``; the toolbox's scope is left as it was."""
    import torch
    from mmengine.registry import DefaultScope

    from mmssm.models.pruning import LearnedTokenPruner
    from mmssm.utils.flops import measure_direction_keep

    (row,) = bench.select_rows([key], None)  # a whole key: its row only
    scope = DefaultScope.get_current_instance()
    model = bench.build(row).eval()
    assert DefaultScope.get_current_instance() is scope
    ssm = model.model.backbone.backbone
    assert isinstance(ssm.pruner, LearnedTokenPruner)
    assert ssm.pruner.align is key.endswith('-align')
    assert ssm.pruner.layers == (2,) and ssm.num_layers == 4
    x = torch.randn(4, 3, *row.shape)
    with torch.no_grad():
        results = model(x)
    assert len(results) == 4 and type(results[0]).__name__ == sample
    if sample == 'SegDataSample':
        assert results[0].pred_sem_seg.data.shape[-2:] == row.shape
    else:
        assert 'bboxes' in results[0].pred_instances
    # the gates were set to a budget of 0.8 (at their init they run all)
    assert 0.5 <= measure_direction_keep(model, [x]) < 1


def test_e2e_tiny_row_timed(bench):
    """A segmentor row timed as the worker times it: images/s, peak
    memory and the fraction of directions its gates ran, in its line of
    the table."""
    (row,) = bench.select_rows(['test-tiny-e2e-upernet-dyvm'], None)
    (result,) = bench.run_rows([row], iters=1, warmup=0, threads=1)
    assert result['iters'] == 1 and result['images_per_s'] > 0
    assert result['peak_fwd_mib'] > 0
    assert 0.5 <= result['direction_keep'] < 1
    result['wall_s'] = 1.0
    line = bench.format_table([row], {row.key: result}).splitlines()[-1]
    assert line.startswith('| tiny UperNet DyVM | 64x64 | 1 | cpu |')
    assert line.endswith(f' | {result["direction_keep"]:.2f} |')


# --------------------------------------------------------------------------
# tools/analysis_tools/benchmark_peer.py (issue 18's table): the mechanics,
# and what its profile section reads, on tiny models.
# --------------------------------------------------------------------------
PEER = osp.join('tools', 'analysis_tools', 'benchmark_peer.py')


@pytest.fixture(scope='module')
def peer(tools):
    return tools.load_script(PEER)


def test_peer_tables(peer):
    import torch

    models = {'a': torch.nn.Linear(4, 4), 'b': torch.nn.Linear(4, 2)}
    res = peer.time_group(models, torch.randn(1, 4), 2, 0, True)
    assert set(res) == {'a', 'b'} and all(f > 0 for f, _ in res.values())
    lines = peer.ratio_table(
        'T', ['224'], {'224': {'a': (4.0, 8.0), 'b': (2.0, 2.0)}}, [('a', 'b')]
    )
    assert '| input | pass | a (ms) | b (ms) | a / b |' in lines
    assert '| 224 | fwd | 4 | 2 | 2.00 |' in lines
    assert '| 224 | fwd+bwd | 8 | 2 | 4.00 |' in lines
    with pytest.raises(SystemExit):
        peer.parse_args(['--rounds', '0'])


def test_peer_profile_no_gathers_no_flips(peer):
    """The dense forwards move no data around the scans: PlainMamba's four
    orders are index patterns (no aten::gather), Vim's backward direction
    is a reversed scan (no aten::flip) on the Linear layers' layout (no
    copies per layer)."""
    import torch

    from mmssm.models.backbones import PlainMamba, Vim
    from mmssm.testing import tiny_arch

    x = torch.randn(1, 3, 64, 64)
    pm = PlainMamba(tiny_arch('plainmamba'), img_size=64).eval()
    shares = peer.profile_shares(pm, x)
    assert shares['aten::gather'][1] == 0
    assert shares['scan'][1] == 4 * pm.num_layers
    vim = Vim(tiny_arch('vim'), img_size=64).eval()
    shares = peer.profile_shares(vim, x)
    assert shares['scan'][1] == 2 * vim.num_layers
    with torch.no_grad():
        with torch.profiler.profile(record_shapes=True) as prof:
            vim(x)
    events = prof.key_averages(group_by_input_shape=True)
    assert not [e for e in events if e.key == 'aten::flip']
    copies = [
        e.count
        for e in events
        if e.key == 'aten::copy_' and e.input_shapes[0]  # not 0-dim
    ]
    assert sum(copies) < vim.num_layers  # none per layer (the output map)
