"""A segmentor that predicts the ground truth, for the evaluation tests.

Imported by ``custom_imports`` in a ``tools/test.py`` subprocess of
tests/test_tools/test_seg_tools.py (and directly by that file), so that the
ground truth goes through the same path as a model's predictions: the
config's dataset and test pipeline, the data preprocessor, the test loop,
``IoUMetric`` and ``--out``.
"""

from typing import List, Optional

import torch
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from mmengine.structures import PixelData


@MODELS.register_module()
class GroundTruthSegmentor(BaseModel):
    """Predict each sample's ``gt_sem_seg``.

    It has no weights, so an empty checkpoint (``{'state_dict': {}}``)
    matches it.

    Args:
        data_preprocessor (dict): The data preprocessor config (the one of
            the segmentor it stands in for).
        fill (int, optional): The prediction at the pixels whose label is
            not a class (``ignore_index`` or any value outside
            ``[0, num_classes)``); None keeps the label there.
            Defaults to None.
        num_classes (int): Defaults to 150.
    """

    def __init__(
        self,
        data_preprocessor: dict,
        fill: Optional[int] = None,
        num_classes: int = 150,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.fill = fill
        self.num_classes = num_classes

    def forward(
        self, inputs: torch.Tensor, data_samples=None, mode: str = 'tensor'
    ) -> List:
        if mode != 'predict':
            raise ValueError(f'{type(self).__name__} only predicts')
        for sample in data_samples:
            label = sample.gt_sem_seg.data.clone()
            if self.fill is not None:
                label[(label < 0) | (label >= self.num_classes)] = self.fill
            sample.pred_sem_seg = PixelData(data=label)
        return data_samples
