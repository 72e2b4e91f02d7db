"""Exact and fast resume: random states and the sampler position.

mmengine's ``Runner.resume`` restores the model, the optimizer, the
schedulers and the counters, but no random state, so a resumed run draws
other augmentations, samples and drop paths than the run it continues; and
``IterBasedTrainLoop`` skips the batches already trained by loading and
transforming every one of them (``next(dataloader_iterator)`` once per
iteration: resuming at iteration 150k of a 160k schedule re-reads most of
the data set before the first new step).

:class:`ResumeHook` puts the random states (Python, NumPy, torch, and CUDA
where it is initialised) and the sampler position (batches drawn) into
every checkpoint, and on resume:

- replays the batch sampler to that position (indices only, no image is
  read), and hands the loop a data loader that starts there; the loop's
  own skipping then costs nothing. The index order is the one of the
  uninterrupted run also with ``num_workers > 0``: the workers only ever
  receive the batches after the position;
- restores the random states, after everything that the Runner draws
  before the first iteration, so that on the CPU, in one process, with
  ``num_workers=0``, a resumed run logs exactly the losses of the
  uninterrupted one.

Validation leaves the training's random states as it found them (they are
saved before and restored after it), so a run resumed from a checkpoint
saved where a validation followed continues as the uninterrupted run.
With several processes only rank 0's states are in the checkpoint (only
rank 0 writes it): the other ranks keep their seeded states.
"""

import logging
import random
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop
from torch.utils.data import DataLoader

from mmssm.registry import HOOKS

CHECKPOINT_KEY = 'resume'


def get_random_states() -> dict:
    """Python's, NumPy's, torch's (and CUDA's, if initialised) states."""
    states = dict(
        python=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    """Restore what :func:`get_random_states` returned."""
    random.setstate(_python_state(states['python']))
    np.random.set_state(states['numpy'])
    torch.set_rng_state(states['torch'].cpu())
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states['cuda']])


def _python_state(state) -> tuple:
    # a loaded checkpoint may hold the tuples as lists
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _set_epoch(dataloader: DataLoader, epoch: int) -> None:
    """The sampler's epoch, as mmengine's infinite iterator sets it."""
    sampler = getattr(dataloader, 'sampler', None)
    if not hasattr(sampler, 'set_epoch'):
        sampler = getattr(dataloader.batch_sampler, 'sampler', None)
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)


def advance_batch_sampler(
    dataloader: DataLoader, batches: int
) -> Tuple[int, Iterator]:
    """Draw ``batches`` batches of indices from a loader's batch sampler.

    Only indices are drawn (no sample is loaded); at the end of an epoch
    the sampler's next epoch starts, as in mmengine's infinite iterator.

    Args:
        dataloader (DataLoader): The training loader.
        batches (int): How many batches the run has trained on.

    Returns:
        tuple[int, Iterator]: The epoch of the sampler, and the iterator
        of the batch sampler positioned after those batches.
    """
    batch_sampler = dataloader.batch_sampler
    if batch_sampler is None:
        raise TypeError('the training loader has no batch sampler')
    # mmdet's AspectRatioBatchSampler keeps its part-filled buckets on the
    # instance: the loader's first iterator may have filled them already
    for bucket in getattr(batch_sampler, '_aspect_ratio_buckets', ()):
        bucket.clear()
    epoch = 0
    iterator = iter(batch_sampler)
    drawn = 0
    while drawn < batches:
        try:
            next(iterator)
            drawn += 1
        except StopIteration:
            epoch += 1
            _set_epoch(dataloader, epoch)
            iterator = iter(batch_sampler)
    return epoch, iterator


class _Rest:
    """A batch sampler that yields the rest of an iterator of batches."""

    def __init__(self, iterator: Iterator, length: int) -> None:
        self.iterator = iterator
        self.length = length

    def __iter__(self) -> Iterator:
        return self.iterator

    def __len__(self) -> int:
        return self.length


def _loader_from(dataloader: DataLoader, batches: Iterator) -> DataLoader:
    """``dataloader`` with its batch sampler replaced by ``batches``."""
    workers = dataloader.num_workers
    return DataLoader(
        dataloader.dataset,
        batch_sampler=_Rest(batches, len(dataloader.batch_sampler)),
        num_workers=workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=dataloader.generator,
        prefetch_factor=dataloader.prefetch_factor if workers else None,
        pin_memory_device=dataloader.pin_memory_device,
    )


class ResumedDataloaderIterator:
    """The training batches from ``start`` on, without loading the others.

    Takes the place of the loop's ``dataloader_iterator``: the first
    ``start`` calls of ``next`` (the loop's own skipping) return None at
    once, the next ones the batches after ``start``; after the last batch
    of an epoch the loader restarts with the next epoch, as mmengine's
    infinite iterator does.

    Args:
        dataloader (DataLoader): The loop's training loader.
        start (int): The batches already trained on.
    """

    def __init__(self, dataloader: DataLoader, start: int) -> None:
        self._dataloader = dataloader
        self._to_skip = start
        self._epoch, batches = advance_batch_sampler(dataloader, start)
        self._iterator = iter(_loader_from(dataloader, batches))

    def __iter__(self) -> 'ResumedDataloaderIterator':
        return self

    def __next__(self):
        if self._to_skip:
            self._to_skip -= 1
            return None
        try:
            return next(self._iterator)
        except StopIteration:
            self._epoch += 1
            _set_epoch(self._dataloader, self._epoch)
            self._iterator = iter(self._dataloader)
            return next(self._iterator)


@HOOKS.register_module()
class ResumeHook(Hook):
    """Exact, fast resume (see the module's notes).

    In our configs' defaults through ``mmssm.Runner``; by hand::

        default_hooks = dict(resume=dict(type='mmssm.ResumeHook'))

    Args:
        restore_random_states (bool): Restore the random states on resume.
            Defaults to True.
        fast_skip (bool): Skip the trained batches in the sampler instead
            of loading them (``IterBasedTrainLoop``). Defaults to True.
    """

    priority = 'VERY_LOW'  # last of before_train: nothing draws after it

    def __init__(
        self, restore_random_states: bool = True, fast_skip: bool = True
    ) -> None:
        self.restore_random_states = restore_random_states
        self.fast_skip = fast_skip
        self._loaded: Optional[dict] = None
        self._val_states: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = dict(
            random_states=get_random_states(),
            rank=get_rank(),
            batches=checkpoint['meta'].get('iter', runner.iter),
        )

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = checkpoint.get(CHECKPOINT_KEY)

    def before_train(self, runner) -> None:
        loaded, self._loaded = self._loaded, None
        loop = runner.train_loop
        if loop.iter == 0:  # a new run (load_from only loads weights)
            return
        if self.fast_skip and isinstance(loop, IterBasedTrainLoop):
            # before the random states: building the loader draws a seed,
            # as the loop's own loader did in the uninterrupted run
            loop.dataloader_iterator = ResumedDataloaderIterator(
                loop.dataloader, loop.iter
            )
            print_log(
                f'resume: the sampler is advanced past the {loop.iter} '
                'batches already trained (indices only, no data loaded)',
                logger='current',
            )
        if not self.restore_random_states:
            return
        if loaded is None:
            print_log(
                'resume: the checkpoint has no random states (not saved '
                'by mmssm.ResumeHook); the run continues with new ones',
                logger='current',
                level=logging.WARNING,
            )
        elif loaded['rank'] == get_rank():
            set_random_states(loaded['random_states'])
            print_log('resume: random states restored', logger='current')

    def before_val(self, runner) -> None:
        self._val_states = get_random_states()

    def after_val(self, runner) -> None:
        states, self._val_states = self._val_states, None
        if states is not None:
            set_random_states(states)
