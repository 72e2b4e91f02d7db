"""Loading that names the file whenever an image or label map is bad.

mmcv's ``LoadImageFromFile`` (the image loader of mmdet's and mmseg's
pipelines) already fails with ``AssertionError: failed to load image:
<path>`` when the decoder returns nothing, which is what OpenCV does for a
corrupt or truncated JPEG or PNG. Other failures say nothing of the file:
an empty (0-byte) file, the usual remains of a failed download, makes
OpenCV raise ``(-215:Assertion failed) !buf.empty() in function
'imdecode_'``, and with ``ignore_empty=True`` mmcv skips unreadable files
silently. mmseg's ``LoadAnnotations`` decodes label maps with Pillow, whose
errors (``OSError: image file is truncated``, ``cannot identify image file
<_io.BytesIO ...>``) never name the file either.

:class:`LoadImageFromFile` and :class:`LoadSegAnnotations` are drop-in
replacements that fail with the path in every case (or, for images, skip
with a warning naming it). Only mmcv is imported here; mmseg is imported
when a :class:`LoadSegAnnotations` is built.
"""

import logging
from typing import Optional

from mmcv.transforms import BaseTransform
from mmcv.transforms import LoadImageFromFile as _MMCVLoadImageFromFile
from mmengine.logging import print_log

from mmssm.registry import TRANSFORMS


class ImageLoadError(OSError):
    """An image file of a data set is missing, empty, corrupt or truncated."""


def _cause(error: Exception) -> str:
    """What went wrong, in words, from a decoder's exception."""
    text = str(error).strip()
    if isinstance(error, AssertionError) or "'NoneType'" in text:
        return 'the file is corrupt, truncated or not an image'  # OpenCV
    if '!buf.empty()' in text:
        return 'the file is empty'
    if text.startswith('cannot identify image file'):  # Pillow
        return 'the file is empty, corrupt or not an image'
    if text.startswith('image file is truncated'):  # Pillow
        return 'the file is truncated'
    return f'{type(error).__name__}: {text}'


@TRANSFORMS.register_module()
class LoadImageFromFile(_MMCVLoadImageFromFile):
    """mmcv's ``LoadImageFromFile``, naming the file when it cannot be read.

    A drop-in replacement: the same arguments and results. An image that
    cannot be read or decoded (missing, empty, corrupt or truncated file)
    raises :class:`ImageLoadError` (an ``OSError``) whose message starts
    with ``cannot load image '<path>'`` and gives the cause, so a training
    or test run stops at the first bad image and says which one::

        dict(type='mmssm.LoadImageFromFile'),

    With ``ignore_empty=True`` the bad image is skipped instead, with a
    warning naming it in the log: the transform returns None, and mmengine's
    ``BaseDataset`` then draws another sample (training only; at test time
    mmengine refuses a None, so that no image silently drops out of an
    evaluation).

    Args:
        ignore_empty (bool): Skip bad images (warn and return None) instead
            of raising. Defaults to False.
        **kwargs: The other arguments of mmcv's ``LoadImageFromFile``
            (``to_float32``, ``color_type``, ``imdecode_backend``,
            ``backend_args``...).
    """

    def __init__(self, ignore_empty: bool = False, **kwargs) -> None:
        super().__init__(ignore_empty=False, **kwargs)
        self.skip_bad = bool(ignore_empty)

    def transform(self, results: dict) -> Optional[dict]:
        """Load the image of ``results['img_path']``.

        Args:
            results (dict): Result dict from mmengine's ``BaseDataset``.

        Returns:
            dict | None: ``results`` with ``img``, ``img_shape`` and
            ``ori_shape``; None if the image is bad and ``ignore_empty``.

        Raises:
            ImageLoadError: If the image cannot be read or decoded (and not
                ``ignore_empty``).
        """
        filename = results['img_path']
        try:
            return super().transform(results)
        except Exception as e:  # every cause, reported with the path
            cause = _cause(e)
        image_id = results.get('img_id')
        name = str(filename)
        where = '' if image_id is None else f' (image id {image_id})'
        message = f'cannot load image {name!r}{where}: {cause}'
        if self.skip_bad:
            print_log(
                f'{message}; skipped (ignore_empty=True)',
                logger='current',
                level=logging.WARNING,
            )
            return None
        raise ImageLoadError(message)

    def __repr__(self) -> str:
        return (
            super()
            .__repr__()
            .replace('ignore_empty=False', f'ignore_empty={self.skip_bad}')
        )


@TRANSFORMS.register_module()
class LoadSegAnnotations(BaseTransform):
    """mmseg's ``LoadAnnotations``, naming the label map it cannot read.

    A drop-in replacement of mmseg's ``LoadAnnotations`` (which it runs):
    the same arguments and results. A label map that cannot be read or
    decoded raises :class:`ImageLoadError` whose message starts with
    ``cannot load segmentation map '<path>'``::

        dict(type='mmssm.LoadSegAnnotations', reduce_zero_label=True),

    A sample without ``seg_map_path`` passes unchanged: mmseg's
    ``inference_model`` drops ``LoadAnnotations`` from the test pipeline
    by its type name, and keeps this one, so it must do nothing there.

    Args:
        **kwargs: The arguments of mmseg's ``LoadAnnotations``
            (``reduce_zero_label``, ``imdecode_backend``,
            ``backend_args``).
    """

    def __init__(self, **kwargs) -> None:
        import mmseg.registry  # noqa: F401  (the mmseg scope)

        self.load = TRANSFORMS.build(
            dict(type='mmseg.LoadAnnotations', **kwargs)
        )

    def transform(self, results: dict) -> dict:
        """Load the label map of ``results['seg_map_path']``.

        Args:
            results (dict): Result dict from mmseg's datasets.

        Returns:
            dict: ``results`` with ``gt_seg_map`` (see mmseg); unchanged
            if it has no ``seg_map_path``.

        Raises:
            ImageLoadError: If the label map cannot be read or decoded.
        """
        path = results.get('seg_map_path')
        if path is None:  # inference (mmseg's inference_model): no labels
            return results
        try:
            return self.load(results)
        except Exception as e:  # every cause, reported with the path
            raise ImageLoadError(
                f'cannot load segmentation map {str(path)!r}: {_cause(e)}'
            ) from None

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.load!r})'
