"""A synthetic image-classification set: one glyph on textured clutter.

Each image holds one dark object of one of six classes
(:data:`CLS_CLASSES`), told apart by their structure only: a glyph of
filled cells on a 3 x 3 grid (:data:`GLYPHS`: a plus, a diagonal cross, a
ring, an L, a T and two parallel bars). Its cell size (13 to 20 pixels at
128 x 128, about one 16 x 16 patch), position, rotation (a multiple of 90
degrees plus a tilt of up to 15 degrees) and colour (any hue, dark) are
random, so no single patch tells the class: a model has to relate the
patches of the glyph. It is drawn with anti-aliased edges on light
clutter: a smooth colour field, an oriented grating, random line segments
and dots in random (lighter) colours, and pixel noise. The glyph covers
about a tenth of the image, so most tokens of a vision model are
background: the set is made for token pruning, whose importance score
should keep the glyph's tokens.

Same arguments, same tensors: image ``i`` of a split is drawn from its own
``numpy.random.RandomState((seed, split, i))`` (so the test images do not
depend on how many training images there are), and its class is
``i % len(CLS_CLASSES)`` (balanced splits). The images are rendered with
PyTorch on the CPU in float32 and returned as uint8 tensors, held in
memory (48 KB per 128 x 128 image); :func:`write_synthetic_cls` writes
them to disk in mmpretrain's folder layout.

numpy is imported when a set is made; only torch at module level.
"""

import math
import os
import os.path as osp
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssm.utils.fileio import atomic_imwrite, atomic_write

#: The classes, in the order of their labels.
CLS_CLASSES = ('plus', 'cross', 'ring', 'ell', 'tee', 'bars')

#: Bumped whenever the images of a seed change.
GENERATOR_VERSION = 1

#: The splits and their ids in the per-image seed.
SPLITS = {'train': 0, 'test': 1}

#: The glyph's cell size, as a fraction of the image side (at 128 x 128:
#: 13 to 20 pixels, about one 16 x 16 patch).
MIN_CELL, MAX_CELL = 0.10, 0.16
#: Rotation: a multiple of 90 degrees plus a tilt of up to this (radians).
MAX_TILT = math.radians(15)
BG_LOW = 110.0  # the background's colour field is in BG_LOW .. 240
CLUTTER_LOW = 80.0  # the clutter's colours are in CLUTTER_LOW .. 255
OBJECT_HIGH = 70.0  # the object's colour is in 0 .. OBJECT_HIGH
MIN_CONTRAST = 90.0  # least RGB distance of the object from its background
BACKGROUND_NOISE = 10.0  # std of the per-pixel noise, grey levels
OBJECT_NOISE = 6.0


#: Each class is a glyph of filled cells on a 3 x 3 grid (rows top to
#: bottom, '#' filled): its structure spans several patches of a vision
#: model, so a model must relate tokens to tell the classes apart.
GLYPHS = {
    'plus': ('.#.', '###', '.#.'),
    'cross': ('#.#', '.#.', '#.#'),
    'ring': ('###', '#.#', '###'),
    'ell': ('#..', '#..', '###'),
    'tee': ('###', '.#.', '.#.'),
    'bars': ('#.#', '#.#', '#.#'),
}


def _glyph_distance(
    label: int, u: Tensor, v: Tensor, overlap: float = 0.0
) -> Tensor:
    """Signed distance (in cells) from the outline of a glyph.

    ``u``, ``v`` are coordinates in the glyph's frame, in cells, the glyph
    centred at 0 (its cells span -1.5 .. 1.5); negative inside. The
    distance is the smallest box distance to a filled cell (exact outside,
    a bound inside), which is all the anti-aliasing needs. Each cell is
    grown by ``overlap`` (cells) on every side, so that two neighbouring
    cells merge without a seam.
    """
    rows = GLYPHS[CLS_CLASSES[label]]
    dist = None
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell != '#':
                continue
            d = torch.maximum((u - (j - 1)).abs(), (v - (i - 1)).abs())
            d = d - 0.5 - overlap
            dist = d if dist is None else torch.minimum(dist, d)
    return dist


def _background(rng, h: int, w: int, ys: Tensor, xs: Tensor) -> Tensor:
    """(3, h, w) float32 clutter, grey levels (about 0..255)."""
    coarse = torch.from_numpy(rng.uniform(BG_LOW, 240, size=(1, 3, 4, 4)))
    image = F.interpolate(
        coarse.float(), size=(h, w), mode='bicubic', align_corners=True
    )[0]
    # an oriented grating
    theta = rng.uniform(0, math.pi)
    freq = rng.uniform(3, 10) * 2 * math.pi / max(h, w)
    phase = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(8, 25)
    wave = torch.sin(
        (xs * math.cos(theta) + ys * math.sin(theta)) * freq + phase
    )
    image = image + amp * wave
    # line segments and dots in random colours
    side = min(h, w)
    for _ in range(rng.randint(6, 13)):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        t = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.08, 0.3) * side
        half_width = rng.uniform(0.5, 1.2)
        colour = torch.from_numpy(rng.uniform(CLUTTER_LOW, 255, size=3))
        colour = colour.float()
        dx, dy = math.cos(t), math.sin(t)
        along = ((xs - x0) * dx + (ys - y0) * dy).clamp(0, length)
        dist = torch.hypot(xs - x0 - along * dx, ys - y0 - along * dy)
        alpha = (half_width + 0.5 - dist).clamp(0, 1)
        image = image + alpha * (colour[:, None, None] - image)
    for _ in range(rng.randint(4, 11)):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        radius = rng.uniform(1.0, 3.0)
        colour = torch.from_numpy(rng.uniform(CLUTTER_LOW, 255, size=3))
        colour = colour.float()
        alpha = (radius + 0.5 - torch.hypot(xs - x0, ys - y0)).clamp(0, 1)
        image = image + alpha * (colour[:, None, None] - image)
    noise = rng.normal(0, BACKGROUND_NOISE, size=(3, h, w))
    return image + torch.from_numpy(noise).float()


def draw_image(
    rng, label: int, h: int, w: int, return_mask: bool = False
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """One image of class ``label``.

    Args:
        rng (numpy.random.RandomState): The image's random state.
        label (int): Class index into :data:`CLS_CLASSES`.
        h (int): Height.
        w (int): Width.
        return_mask (bool): Also return the object's mask. Defaults to
            False.

    Returns:
        Tensor | tuple[Tensor, Tensor]: (3, h, w) uint8 RGB, and the
        (h, w) uint8 object coverage of each pixel (0 .. 255, its
        anti-aliased alpha) if ``return_mask``.
    """
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    image = _background(rng, h, w, ys, xs)
    side = min(h, w)
    cell = rng.uniform(MIN_CELL, MAX_CELL) * side
    r = 1.5 * math.sqrt(2) * cell  # circumscribed radius
    cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
    angle = rng.randint(4) * math.pi / 2 + rng.uniform(-1, 1) * MAX_TILT
    cos, sin = math.cos(angle), math.sin(angle)
    u = ((xs - cx) * cos + (ys - cy) * sin) / cell
    v = (-(xs - cx) * sin + (ys - cy) * cos) / cell
    dist = _glyph_distance(label, u, v, overlap=1 / cell)
    alpha = (0.5 - dist * cell).clamp(0, 1)
    under = (image * alpha).sum((1, 2)) / alpha.sum().clamp(min=1)
    for _ in range(30):
        colour = torch.from_numpy(rng.uniform(0, OBJECT_HIGH, size=3))
        colour = colour.float()
        if torch.linalg.vector_norm(colour - under) >= MIN_CONTRAST:
            break
    shade = torch.from_numpy(rng.normal(0, OBJECT_NOISE, size=(3, h, w)))
    fill = colour[:, None, None] + shade.float()
    image = image + alpha * (fill - image)
    image = image.round().clamp(0, 255).to(torch.uint8)
    if return_mask:
        return image, (alpha * 255).round().to(torch.uint8)
    return image


def make_synthetic_cls(
    num_images: int,
    image_size: Union[int, Tuple[int, int]] = 128,
    seed: int = 0,
    split: str = 'train',
    return_masks: bool = False,
) -> Tuple[Tensor, ...]:
    """Make a split of the synthetic classification set, in memory.

    Args:
        num_images (int): Images to make (>= 0).
        image_size (int | tuple[int, int]): Side, or (height, width), each
            >= 32. Defaults to 128.
        seed (int): Seed of the set (>= 0). Defaults to 0.
        split (str): 'train' or 'test': the two splits of one seed are
            drawn from different random states. Defaults to 'train'.
        return_masks (bool): Also return the objects' masks (the images
            are the same either way). Defaults to False.

    Returns:
        tuple[Tensor, ...]: Images (num_images, 3, h, w) uint8 RGB and
        labels (num_images, ) int64, ``labels[i] = i % len(CLS_CLASSES)``;
        with ``return_masks``, also the object coverage of each pixel
        (num_images, h, w) uint8 (0 .. 255).
    """
    import numpy as np

    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 32:
        raise ValueError(
            f'image_size must be an int or (height, width), each >= 32, '
            f'got {image_size!r}'
        )
    if split not in SPLITS:
        raise ValueError(
            f'split must be one of {tuple(SPLITS)}, got {split!r}'
        )
    if int(num_images) < 0 or int(seed) < 0:
        raise ValueError(
            f'num_images and seed must be >= 0, got {num_images}, {seed}'
        )
    h, w = size
    images = torch.empty(int(num_images), 3, h, w, dtype=torch.uint8)
    labels = torch.arange(int(num_images)) % len(CLS_CLASSES)
    masks = None
    if return_masks:
        masks = torch.empty(int(num_images), h, w, dtype=torch.uint8)
    # The ops are small: one thread is several times faster than many on a
    # busy machine (and the result does not depend on it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(int(num_images)):
            rng = np.random.RandomState((int(seed), SPLITS[split], i))
            images[i], mask = draw_image(
                rng, int(labels[i]), h, w, return_mask=True
            )
            if masks is not None:
                masks[i] = mask
    finally:
        torch.set_num_threads(threads)
    if return_masks:
        return images, labels, masks
    return images, labels


#: The splits of the set on disk: the in-memory split each is drawn from.
FOLDER_SPLITS = {'train': 'train', 'val': 'test'}


def write_synthetic_cls(
    out_dir: str,
    num_train: int = 600,
    num_val: int = 120,
    image_size: Union[int, Tuple[int, int]] = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> bool:
    """Write the synthetic classification set in mmpretrain's layout.

    ``<split>/<class>/<index>.png`` with an annotation list
    ``meta/<split>.txt`` of ``<path> <label>`` lines (the ImageNet layout
    of mmpretrain's ``CustomDataset``), for the splits 'train' and 'val'
    (the in-memory 'test' split). The images are those of
    :func:`make_synthetic_cls`; the folder is written whole or not at all
    (see :mod:`.set_folder`).

    Args:
        out_dir (str): Where the set goes.
        num_train (int): Training images (>= 1). Defaults to 600.
        num_val (int): Validation images (>= 1). Defaults to 120.
        image_size (int | tuple[int, int]): Side, or (height, width).
            Defaults to 128.
        seed (int): Seed of the set. Defaults to 0.
        overwrite (bool): Replace a set made with other parameters.
            Defaults to False.

    Returns:
        bool: True if written, False if ``out_dir`` already held this set.
    """

    from .set_folder import write_set

    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')
    size = image_size if isinstance(image_size, int) else list(image_size)
    meta = dict(
        generator='mmssm.datasets.synthetic_cls',
        version=GENERATOR_VERSION,
        num_train=num_train,
        num_val=num_val,
        image_size=size,
        seed=seed,
        classes=list(CLS_CLASSES),
    )

    def build(root: str) -> None:
        os.makedirs(osp.join(root, 'meta'))
        counts = dict(train=num_train, val=num_val)
        for split, source in FOLDER_SPLITS.items():
            images, labels = make_synthetic_cls(
                counts[split], image_size, seed, source
            )
            lines = []
            for i, (image, label) in enumerate(zip(images, labels)):
                rel = osp.join(split, CLS_CLASSES[label], f'{i:06d}.png')
                os.makedirs(osp.dirname(osp.join(root, rel)), exist_ok=True)
                bgr = image.permute(1, 2, 0).numpy()[..., ::-1]
                atomic_imwrite(osp.join(root, rel), bgr)
                lines.append(f'{rel} {int(label)}\n')
            atomic_write(
                osp.join(root, 'meta', f'{split}.txt'), ''.join(lines)
            )

    files = [osp.join('meta', f'{s}.txt') for s in FOLDER_SPLITS]
    return write_set(out_dir, meta, build, overwrite, files)
