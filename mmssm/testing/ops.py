"""Helpers for testing the ops against their references (as mmdet.testing).

Used by tests/test_ops: the ``needs_ext`` mark, random kept-token
positions, the output of an op with the gradients of a fixed random
projection of it, and a relative comparison.
"""

import os
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor

from mmssm.ops import ext_status


def in_ci() -> bool:
    """Whether the tests run in CI (the environment variable ``CI``)."""
    return os.environ.get('CI', '').lower() in ('1', 'true', 'yes')


def _needs_ext() -> pytest.MarkDecorator:
    status = ext_status()
    # In CI the extension must be there: a test of the kernel then runs and
    # fails (with the import error) instead of being skipped.
    skip = status != 'built' and not in_ci()
    return pytest.mark.skipif(skip, reason=f'mmssm._ext is {status}')


#: Mark for tests of the compiled kernels: skipped when ``mmssm._ext`` is
#: not available, except in CI (``CI=true``), where they fail.
needs_ext = _needs_ext()


def random_positions(batch: int, K: int, L: int) -> Tensor:
    """Sorted random subsets of K of L positions, one per batch element."""
    return torch.stack(
        [torch.randperm(L)[:K].sort().values for _ in range(batch)]
    )


def output_and_grads(
    op: Callable[..., Tensor], inputs: Dict[str, Optional[Tensor]], **kwargs
) -> Tuple[Tensor, List[Optional[Tensor]]]:
    """``op(**inputs, **kwargs)`` and the gradients of a fixed random
    projection of it with respect to the inputs that are not None."""
    y = op(**inputs, **kwargs)
    weight = torch.randn(
        y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype
    )
    tensors = [t for t in inputs.values() if t is not None]
    if not y.numel():
        return y, []
    grads = torch.autograd.grad((y * weight).sum(), tensors, allow_unused=True)
    return y, list(grads)


def assert_close_rel(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """Max abs error within ``rtol`` of the largest expected magnitude."""
    assert actual.shape == expected.shape
    if not expected.numel():
        return
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f'relative error {err:.3e} > {rtol:.1e}'
