"""A synthetic COCO-format instance-segmentation set of simple shapes.

Each image is a textured background (a random low-frequency colour field
plus pixel noise) with one to four filled shapes of three classes,
``circle``, ``square`` (rotated) and ``triangle`` (rotated, equilateral),
of random colour, size and position; the shapes do not overlap, so each
polygon is exactly its object's visible outline. The annotations are COCO
instance segmentation: polygon ``segmentation``, ``bbox`` (the polygon's
bounds), ``area`` (the pixels of its mask), ``iscrowd=0``.

Layout of ``out_dir``::

    train/000000.png ...            val/000000.png ...
    annotations/instances_train.json annotations/instances_val.json
    meta.json                        the parameters it was made with

Same parameters, same bytes: every image is drawn from its own
``numpy.random.RandomState((seed, split, index))`` (so the validation
images do not depend on ``num_train``), the images are PNG and the json is
written with a fixed key order. The set is written into a temporary folder
beside ``out_dir`` and renamed into place when complete, so ``out_dir``
either holds a whole set or does not exist.

Only the standard library is imported at module level; numpy and OpenCV
are imported when a set is made.
"""

import math
import os
import os.path as osp
from typing import Dict, List, Sequence, Tuple, Union

from mmssm.utils.fileio import atomic_imwrite

from .set_folder import dump_json, read_set_meta, write_set

#: The classes, in the order of their category ids (1, 2, 3).
CLASSES = ('circle', 'square', 'triangle')

#: Bumped whenever the images or the annotations of a seed change.
GENERATOR_VERSION = 1

SPLITS = ('train', 'val')

#: Object size (the shape's circumscribed diameter) as a fraction of the
#: shorter image side.
MIN_SIZE, MAX_SIZE = 0.2, 0.5
MAX_OBJECTS = 4
BACKGROUND_NOISE = 10.0  # std of the per-pixel noise, grey levels
OBJECT_NOISE = 6.0
MIN_CONTRAST = 90.0  # least RGB distance of a shape from the background


def _image_size(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(height, width) from an int or an (h, w) pair."""
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 32:
        raise ValueError(
            f'image_size must be an int or (height, width), each >= 32, '
            f'got {image_size!r}'
        )
    return size


def _meta(
    num_train: int, num_val: int, size: Tuple[int, int], seed: int
) -> dict:
    return dict(
        generator='mmssm.datasets.synthetic_coco',
        version=GENERATOR_VERSION,
        num_train=num_train,
        num_val=num_val,
        image_size=list(size),
        seed=seed,
        classes=list(CLASSES),
    )


def _polygon(shape: str, cx: float, cy: float, d: float, angle: float):
    """Vertices (n, 2) of a shape of circumscribed diameter ``d``."""
    import numpy as np

    r = d / 2
    if shape == 'circle':
        t = np.arange(32) * (2 * math.pi / 32)
    elif shape == 'square':
        t = angle + np.arange(4) * (math.pi / 2)
    else:  # equilateral triangle
        t = angle + np.arange(3) * (2 * math.pi / 3)
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    # two decimals: the json holds exactly the polygon the mask was made of
    return np.round(pts, 2)


def _background(rng, h: int, w: int):
    """(h, w, 3) float32 RGB texture: a smooth colour field plus noise."""
    import cv2
    import numpy as np

    coarse = rng.uniform(50, 205, size=(4, 4, 3)).astype(np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    stripes = rng.uniform(0, 12) * np.sin(
        np.arange(w, dtype=np.float32)[None, :] * rng.uniform(0.1, 0.6)
        + np.arange(h, dtype=np.float32)[:, None] * rng.uniform(0.1, 0.6)
    )
    noise = rng.normal(0, BACKGROUND_NOISE, size=(h, w, 3))
    return field + stripes[..., None] + noise.astype(np.float32)


def _rasterise(pts, h: int, w: int):
    """The (h, w) uint8 mask of a convex polygon in COCO pixel coordinates.

    A pixel belongs to the shape if its centre ``(j + 0.5, i + 0.5)`` is
    inside the polygon (COCO's pixel ``(i, j)`` spans ``[j, j + 1) x [i,
    i + 1)``), so the mask's area is the polygon's area up to the boundary
    pixels, as pycocotools rasterises it.
    """
    import numpy as np

    x, y = pts[:, 0], pts[:, 1]
    # orientation of the vertices: +1 counter-clockwise in (x, y)
    sign = np.sign(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    ys = np.arange(h, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float64)[None, :] + 0.5
    inside = np.ones((h, w), bool)
    for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0)):
        cross = (bx - ax) * (ys - ay) - (by - ay) * (xs - ax)
        inside &= sign * cross >= 0
    return inside.astype(np.uint8)


def _make_image(rng, h: int, w: int):
    """One image (h, w, 3) uint8 RGB and its objects."""
    import numpy as np

    image = _background(rng, h, w)
    objects = []
    boxes = []
    side = min(h, w)
    for _ in range(rng.randint(1, MAX_OBJECTS + 1)):
        for _attempt in range(30):
            label = rng.randint(len(CLASSES))
            d = rng.uniform(MIN_SIZE, MAX_SIZE) * side
            angle = rng.uniform(0, 2 * math.pi)
            cx = rng.uniform(d / 2 + 1, w - d / 2 - 1)
            cy = rng.uniform(d / 2 + 1, h - d / 2 - 1)
            pts = _polygon(CLASSES[label], cx, cy, d, angle)
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0)
            box = (x0 - 3, y0 - 3, x1 + 3, y1 + 3)
            if all(
                box[2] <= b[0]
                or b[2] <= box[0]
                or box[3] <= b[1]
                or b[3] <= box[1]
                for b in boxes
            ):
                break
        else:
            continue  # no free place for this object
        mask = _rasterise(pts, h, w)
        area = int(mask.sum())
        if area == 0:
            continue
        under = image[mask.astype(bool)].mean(0)
        for _attempt in range(30):
            colour = rng.uniform(0, 255, size=3)
            if np.linalg.norm(colour - under) >= MIN_CONTRAST:
                break
        shade = rng.normal(0, OBJECT_NOISE, size=(h, w, 3))
        fill = colour[None, None, :] + shade
        image = np.where(mask[..., None].astype(bool), fill, image)
        boxes.append(box)
        objects.append(
            dict(
                category_id=label + 1,
                segmentation=[[float(v) for v in pts.reshape(-1)]],
                area=area,
                bbox=[
                    float(round(x0, 2)),
                    float(round(y0, 2)),
                    float(round(x1 - x0, 2)),
                    float(round(y1 - y0, 2)),
                ],
                iscrowd=0,
            )
        )
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def _write_image(path: str, image) -> None:
    """Write an RGB uint8 image as PNG."""
    atomic_imwrite(path, image[..., ::-1])


def _make_split(
    root: str, split: int, num: int, size: Tuple[int, int], seed: int
) -> Dict[str, List]:
    import numpy as np

    name = SPLITS[split]
    os.makedirs(osp.join(root, name))
    h, w = size
    images, annotations = [], []
    for index in range(num):
        rng = np.random.RandomState([seed, split, index])
        image, objects = _make_image(rng, h, w)
        file_name = f'{index:06d}.png'
        _write_image(osp.join(root, name, file_name), image)
        image_id = index + 1
        images.append(
            dict(id=image_id, file_name=file_name, width=w, height=h)
        )
        for obj in objects:
            annotations.append(
                dict(id=len(annotations) + 1, image_id=image_id, **obj)
            )
    return dict(
        info=dict(
            description=f'mmssm synthetic shapes ({name}), seed {seed}',
            version=str(GENERATOR_VERSION),
        ),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[
            dict(id=i + 1, name=c, supercategory='shape')
            for i, c in enumerate(CLASSES)
        ],
    )


#: The files of a complete set besides its meta.json.
_SET_FILES = [osp.join('annotations', f'instances_{s}.json') for s in SPLITS]


def read_meta(out_dir: str):
    """The parameters a complete set in ``out_dir`` was made with, or None.

    Args:
        out_dir (str): A folder written by :func:`make_synthetic_coco`.

    Returns:
        dict | None: The contents of its ``meta.json``; None if the folder
        is not a complete set.
    """
    return read_set_meta(out_dir, _SET_FILES)


def make_synthetic_coco(
    out_dir: str,
    num_train: int = 400,
    num_val: int = 50,
    image_size: Union[int, Sequence[int]] = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> bool:
    """Write a synthetic COCO instance-segmentation set of shapes.

    If ``out_dir`` already holds a set made with the same parameters,
    nothing is written. The new set is built in a temporary folder beside
    ``out_dir`` and renamed into place when complete; on any error the
    temporary folder is removed and ``out_dir`` is left as it was.

    Args:
        out_dir (str): Where the set goes (see the module docstring).
        num_train (int): Training images. Defaults to 400.
        num_val (int): Validation images. Defaults to 50.
        image_size (int | Sequence[int]): Side, or (height, width), of the
            images in pixels. Defaults to 256.
        seed (int): Seed; the same parameters give the same bytes.
            Defaults to 0.
        overwrite (bool): Replace a set made with other parameters instead
            of raising. Defaults to False.

    Returns:
        bool: True if a set was written, False if ``out_dir`` already held
        this set.

    Raises:
        FileExistsError: ``out_dir`` exists and is not this set (and
            ``overwrite`` is False).
    """
    size = _image_size(image_size)
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f'seed must be a non-negative int, got {seed!r}')
    meta = _meta(num_train, num_val, size, seed)

    def build(root: str) -> None:
        os.makedirs(osp.join(root, 'annotations'))
        for split, num in enumerate((num_train, num_val)):
            coco = _make_split(root, split, num, size, seed)
            dump_json(
                coco,
                osp.join(
                    root, 'annotations', f'instances_{SPLITS[split]}.json'
                ),
            )

    return write_set(out_dir, meta, build, overwrite, _SET_FILES)
