"""Data transforms of the segmentation pipelines.

mmseg ignores the pixels whose label is its ``ignore_index`` (255) in the
loss and in ``IoUMetric``, but any other value outside ``[0, num_classes)``
is not handled: ``F.cross_entropy`` raises ``IndexError: Target ... is out
of bounds`` during training, and ``IoUMetric`` counts the predictions at
such pixels as false positives of the predicted class (only the label side
of its histogram drops them). :class:`IgnoreOutOfRangeLabels` maps those
values to the ignore index right after ``LoadAnnotations``.

Only mmcv and numpy are imported (no mmseg).
"""

from typing import Optional

import numpy as np
from mmcv.transforms import BaseTransform

from mmssm.registry import TRANSFORMS


@TRANSFORMS.register_module()
class IgnoreOutOfRangeLabels(BaseTransform):
    """Give every label that is not a class the ignore index.

    Pixels of the segmentation maps of ``results['seg_fields']`` (mmseg's
    ``LoadAnnotations`` puts ``'gt_seg_map'`` there) whose value is
    negative or at least ``num_classes`` and not ``ignore_index`` are set to
    ``ignore_index``; the other pixels are unchanged. Put it right after
    ``LoadAnnotations`` (and so after its ``reduce_zero_label`` and
    ``label_map``), before any transform that reads the labels (e.g.
    ``RandomCrop``'s ``cat_max_ratio``)::

        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='mmssm.IgnoreOutOfRangeLabels', num_classes=150),

    Required keys: ``seg_fields`` and the maps it names (absent keys are
    skipped). Modified keys: those maps (a new array when one changes).

    Args:
        num_classes (int): Number of classes; labels are
            ``0 .. num_classes - 1``.
        ignore_index (int): The ignore index of the model's heads and of
            the metric. Defaults to 255.
        seg_fields (Sequence[str], optional): The keys of the maps; None
            takes ``results['seg_fields']``. Defaults to None.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        seg_fields: Optional[tuple] = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f'ignore_index {ignore_index} is a class index (num_classes '
                f'{num_classes})'
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.seg_fields = None if seg_fields is None else tuple(seg_fields)

    def transform(self, results: dict) -> dict:
        keys = self.seg_fields
        if keys is None:
            keys = results.get('seg_fields', ())
        for key in keys:
            seg = results.get(key)
            if seg is None:
                continue
            seg = np.asarray(seg)
            bad = (seg >= self.num_classes) & (seg != self.ignore_index)
            if np.issubdtype(seg.dtype, np.signedinteger):
                bad |= seg < 0
            if bad.any():
                seg = seg.copy()
                seg[bad] = self.ignore_index
                results[key] = seg
        return results

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(num_classes={self.num_classes}, '
            f'ignore_index={self.ignore_index}, '
            f'seg_fields={self.seg_fields})'
        )
