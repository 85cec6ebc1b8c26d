"""The data feed: the order is a pure function of (seed, epoch), and a dataset kept on the device
(``feed.resident``, on a GPU) gives the loop exactly the batches and numbers it reads otherwise."""

import pytest
import torch

from minift.training import feed
from minift.training.config import TrainConfig
from minift.training.loop import train
from conftest import TINY_GPT
from minift.models.gpt import GPT, GPTConfig


def gpt(dropout=0.1):
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY_GPT, dropout=dropout))


def batches(n=3, B=2, T=12, seed=1):
    """n batches of B rows, the first row of each with 3 positions of padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, TINY_GPT["vocab_size"], (B, T), generator=g)
        mask = torch.ones_like(x)
        mask[0, -3:] = 0
        out.append({"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)})
    return out


def order_cfg(**kw):
    return TrainConfig(**{"lr": 1e-3, "steps": 1, "seed": 7, **kw})


def test_each_epoch_is_a_permutation_seeded_by_seed_and_epoch():
    c, n = order_cfg(), 5
    epochs = [[feed.index_at(n, e * n + i, c) for i in range(n)] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # shuffled anew each epoch
    g = torch.Generator().manual_seed(7 * 1_000_003 + 2)  # the stream's definition, written out
    assert epochs[2] == torch.randperm(n, generator=g).tolist()
    assert [feed.index_at(n, p, order_cfg(shuffle=False)) for p in range(7)] == [0, 1, 2, 3, 4, 0, 1]
    data = batches(n=5)
    assert feed.batch_at(data, 13, c) is data[epochs[2][3]]


def test_resident_only_for_a_small_plain_list_on_a_gpu(monkeypatch):
    data = batches()
    assert feed.resident(data, "cuda") and feed.resident(tuple(data), "cuda")
    assert not feed.resident(data, "cpu")  # nothing to save on the CPU
    assert not feed.resident(type("Lazy", (list,), {})(data), "cuda")  # a subclass may read lazily
    monkeypatch.setattr(feed, "RESIDENT_BYTES", feed.nbytes(data) - 1)
    assert not feed.resident(data, "cuda")


@pytest.mark.parametrize("keep_masks", [False, True])
def test_a_resident_feed_gives_what_a_streaming_one_does(monkeypatch, keep_masks):
    data = batches(n=3) + [{k: v[1:] for k, v in batches(n=1, seed=5)[0].items()}]  # one batch without padding
    c, model = order_cfg(), gpt()
    streaming = feed.Feed(data, c, torch.device("cpu"), keep_masks)
    monkeypatch.setattr(feed, "resident", lambda batches, device: True)
    kept = feed.Feed(data, c, torch.device("cpu"), keep_masks)
    assert streaming.on_device is None and kept.on_device is not None
    assert feed.Feed(data, order_cfg(fast=False), torch.device("cpu"), keep_masks).on_device is None  # --fast false
    for position in range(9):
        (a, ta, sa), (b, tb, sb) = streaming.at(position, model), kept.at(position, model)
        assert a.keys() == b.keys() and ta == tb and sa == sb == 1.0
        assert all(torch.equal(a[k], b[k]) for k in a)
        i = feed.index_at(len(data), position, c)
        assert ta == int(data[i]["attention_mask"].sum())
    assert ("attention_mask" in kept.on_device[3][0]) == keep_masks  # all ones: dropped unless kept


def test_training_on_a_resident_feed_is_bitwise_the_same_run(monkeypatch, tmp_path):
    c = TrainConfig(lr=3e-3, steps=6, grad_accum=2, warmup=1, progress=False, plot=False, seed=3)
    streamed = train(gpt(), batches(), c)
    monkeypatch.setattr(feed, "resident", lambda batches, device: True)
    kept = train(gpt(), batches(), c)
    assert kept.losses == streamed.losses and kept.tokens_per_s > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_run_on_a_resident_feed_matches_a_streaming_one(monkeypatch):
    c = TrainConfig(lr=3e-3, steps=4, grad_accum=1, warmup=1, progress=False, plot=False, seed=3, device="cuda",
                    compile=False, fast=False, bf16=False)
    kept = train(gpt(dropout=0.0), batches(), c)
    monkeypatch.setattr(feed, "resident", lambda batches, device: False)
    streamed = train(gpt(dropout=0.0), batches(), c)
    # (equal up to the GPU's own run-to-run differences: attention's backward may add in any order)
    torch.testing.assert_close(kept.losses, streamed.losses, rtol=1e-5, atol=1e-6)
