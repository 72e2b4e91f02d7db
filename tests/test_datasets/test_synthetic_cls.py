"""The synthetic classification set: deterministic, balanced, well formed."""

import math

import numpy as np
import pytest
import torch

from mmssm.datasets import CLS_CLASSES, make_synthetic_cls
from mmssm.datasets import synthetic_cls as sc


def test_shapes_and_labels():
    images, labels = make_synthetic_cls(13, image_size=(48, 64), seed=3)
    assert images.shape == (13, 3, 48, 64)
    assert images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert labels.tolist() == [i % len(CLS_CLASSES) for i in range(13)]
    # not blank: a textured image in every channel
    assert images.float().std(dim=(2, 3)).min() > 5


def test_deterministic():
    a = make_synthetic_cls(6, 32, seed=1)
    b = make_synthetic_cls(6, 32, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_independent_of_set_size_and_threads():
    """Image i depends on (seed, split, i) only."""
    small = make_synthetic_cls(3, 32, seed=2, split='test')[0]
    threads = torch.get_num_threads()
    large = make_synthetic_cls(7, 32, seed=2, split='test')[0]
    assert torch.get_num_threads() == threads  # restored
    assert torch.equal(small, large[:3])


def test_seeds_and_splits_differ():
    base = make_synthetic_cls(4, 32, seed=0)[0]
    assert not torch.equal(base, make_synthetic_cls(4, 32, seed=1)[0])
    test = make_synthetic_cls(4, 32, seed=0, split='test')[0]
    assert not torch.equal(base, test)


def test_masks():
    images, labels = make_synthetic_cls(4, 48, seed=5)
    images2, labels2, masks = make_synthetic_cls(
        4, 48, seed=5, return_masks=True
    )
    assert torch.equal(images, images2) and torch.equal(labels, labels2)
    assert masks.shape == (4, 48, 48) and masks.dtype == torch.uint8
    # the object is where the mask is, and darker than the rest
    brightness = images.float().mean(1)
    inside, outside = masks == 255, masks == 0
    assert inside.sum() > 0 and outside.sum() > inside.sum()
    assert brightness[inside].mean() + 60 < brightness[outside].mean()


def test_empty():
    images, labels = make_synthetic_cls(0, 32)
    assert images.shape == (0, 3, 32, 32) and labels.shape == (0,)


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(image_size=16),
        dict(image_size=(32, 32, 3)),
        dict(split='val'),
        dict(seed=-1),
        dict(num_images=-1),
    ],
)
def test_bad_arguments(kwargs):
    kwargs = dict(dict(num_images=1, image_size=32), **kwargs)
    with pytest.raises(ValueError):
        make_synthetic_cls(**kwargs)


def test_glyphs_distinct_under_rotation():
    """No class is another class rotated by a multiple of 90 degrees."""
    grids = {
        name: np.array([[c == '#' for c in row] for row in sc.GLYPHS[name]])
        for name in CLS_CLASSES
    }
    for a in CLS_CLASSES:
        for b in CLS_CLASSES:
            if a == b:
                continue
            for k in range(4):
                assert not np.array_equal(np.rot90(grids[a], k), grids[b])


@pytest.mark.parametrize('label', range(len(CLS_CLASSES)))
def test_glyph_mask(label):
    """Inside exactly the glyph's filled cells (cell centres)."""
    rows = sc.GLYPHS[CLS_CLASSES[label]]
    centres = torch.tensor([-1.0, 0.0, 1.0])
    v, u = torch.meshgrid(centres, centres, indexing='ij')
    inside = sc._glyph_distance(label, u, v) < 0
    expected = torch.tensor([[c == '#' for c in row] for row in rows])
    assert torch.equal(inside, expected)
    # neighbouring filled cells merge: no gap on their shared edge
    if rows[1][1] == '#' and rows[1][2] == '#':
        d = sc._glyph_distance(label, torch.tensor(0.5), torch.tensor(0.0))
        assert d <= 0


def test_object_is_dark_on_light_clutter():
    """The glyph is darker than the background it is drawn on."""
    rng = np.random.RandomState(0)
    image = sc.draw_image(rng, 0, 64, 64).float()
    brightness = image.mean(0)
    # the glyph covers at least a cell, its colour is at most OBJECT_HIGH
    dark = brightness < sc.OBJECT_HIGH + 3 * sc.OBJECT_NOISE
    cell = sc.MIN_CELL * 64
    assert dark.sum() >= math.floor(cell) ** 2
    assert brightness[~dark].mean() > sc.BG_LOW - 20
