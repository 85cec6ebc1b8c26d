"""The training data as the loop reads it: the micro-batch at a position of an endless stream.

Data order is a pure function of ``(seed, epoch)``: epoch e is a permutation of the batches seeded
by (seed, e), so the position in the stream is one integer and a resumed run sees exactly the
batches an uninterrupted one would (``batch_at``).

``Feed`` hands the loop each micro-batch on the training device with its token count. A small
model's step on a GPU is bound by the host (each step's Python work is its time), and copying a
batch there costs the host a pinned buffer and a copy per tensor every step. So on a GPU, with
``TrainConfig.fast``, a list of batches whose tensors come to at most ``RESIDENT_BYTES`` is copied
to the device once, when the feed is built, and read from there (``resident``); otherwise each
micro-batch is copied when the stream reaches it. The batches are the same either way
(``to_device`` is the one copy), and so are the numbers trained on them; the dataset's copy counts
in the run's peak memory.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from minift.training import distributed
from minift.training.forward import to_device

RESIDENT_BYTES = 256 * 2 ** 20  # a dataset up to this size stays on the device for the whole run


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    """The order of ``n`` batches in ``epoch``: a permutation seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def index_at(n: int, position: int, cfg) -> int:
    """Which of ``n`` batches sits at ``position`` of the stream (``cfg``: ``shuffle`` and ``seed``)."""
    epoch, i = divmod(position, n)
    return epoch_order(cfg.seed, epoch, n)[i] if cfg.shuffle else i


def batch_at(batches: Sequence[dict], position: int, cfg) -> dict:
    """The micro-batch at ``position`` of the endless stream."""
    return batches[index_at(len(batches), position, cfg)]


def tokens_in(batch: dict) -> int:
    """The batch's tokens that are not padding (its attention mask's ones; every id without one)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if torch.is_tensor(mask) else batch["input_ids"].numel()


def nbytes(batches: Sequence[dict]) -> int:
    return sum(v.numel() * v.element_size() for b in batches for v in b.values() if torch.is_tensor(v))


def resident(batches: Sequence[dict], device) -> bool:
    """Whether a run keeps all of ``batches`` on ``device``: on a GPU, in one process (several ranks
    each move only their rows), for a plain list or tuple (not a sequence that reads its batches
    lazily, or counts its reads) of at most ``RESIDENT_BYTES``. On the CPU there is nothing to save."""
    return torch.device(device).type == "cuda" and type(batches) in (list, tuple) \
        and distributed.world_size() == 1 and nbytes(batches) <= RESIDENT_BYTES


class Feed:
    """The micro-batches of a run on ``device`` (``keep_masks``: as ``to_device``'s ``keep_mask``).

    ``at(position, model)`` returns this rank's rows of the micro-batch at ``position`` on the
    device, the global micro-batch's token count (taken on the host copy: a sum on the device would
    wait for the GPU), and this rank's share of its loss (``distributed.split``; one process: the
    whole batch and 1.0). Batches that stay ``resident`` are moved when the feed is built; others
    are read a micro-batch at a time, as the stream reaches them."""

    def __init__(self, batches: Sequence[dict], cfg, device, keep_masks: bool = False):
        self.batches, self.cfg, self.device, self.keep_masks = batches, cfg, device, keep_masks
        self.on_device = [(to_device(b, device, keep_masks), tokens_in(b)) for b in batches] \
            if cfg.fast and resident(batches, device) else None  # (--fast false: a micro-batch at a time)

    def at(self, position: int, model: torch.nn.Module) -> tuple[dict, int, float]:
        i = index_at(len(self.batches), position, self.cfg)
        if self.on_device is not None:
            batch, tokens = self.on_device[i]
            return batch, tokens, 1.0
        batch = self.batches[i]
        rows, share = distributed.split(batch, model)  # this rank's rows, its share of the loss
        return to_device(rows, self.device, self.keep_masks), tokens_in(batch), share
