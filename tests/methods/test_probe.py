"""Per-layer linear probes, control tasks and selectivity."""
import json

import pytest
import torch

from minift.methods import probe
from minift.methods.probe import ProbeResult



def synthetic(n=900, dim=16, n_layers=5, informative=3, k=3, seed=0):
    """Features of n_layers "layers": only layer `informative` linearly encodes the label."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    feats = [torch.randn(n, dim, generator=g) for _ in range(n_layers)]
    means = 4.0 * torch.randn(k, dim, generator=g)
    feats[informative] = feats[informative] + means[y]
    return feats, y


def test_only_the_informative_layer_is_decodable_and_control_is_at_chance():
    feats, y = synthetic()
    res = probe.probe_features(feats, y, max_iter=50)
    acc = [r["accuracy"] for r in res.rows]
    assert [r["layer"] for r in res.rows] == [0, 1, 2, 3, 4]
    assert res.n_train == 720 and res.n_test == 180 and res.num_classes == 3
    assert acc[3] >= 0.98 and res.rows[3]["f1"] >= 0.98
    for i in (0, 1, 2, 4):
        assert abs(acc[i] - 1 / 3) < 0.13, (i, acc[i])
        assert res.rows[i]["f1"] < 0.5
    for r in res.rows:
        assert abs(r["control_accuracy"] - 1 / 3) < 0.13, r  # random labels per example
        assert r["selectivity"] == pytest.approx(r["accuracy"] - r["control_accuracy"])
    assert res.rows[3]["selectivity"] > 0.5
    assert max(acc) == acc[3]
    assert 1 / 3 <= res.chance < 0.45  # majority class of the random test split


def test_per_type_control_exposes_a_memorizing_layer():
    """Token task: layer 0 knows only the word type (label = a function of the type), layer 1
    only the label. Both solve the task; only layer 0 also fits the per-type control labels."""
    g = torch.Generator().manual_seed(1)
    n_types, n = 40, 2000
    types = torch.randint(n_types, (n,), generator=g)
    y = types % 2
    type_emb = 3.0 * torch.randn(n_types, 48, generator=g)
    layer0 = type_emb[types] + 0.1 * torch.randn(n, 48, generator=g)
    layer1 = torch.randn(n, 48, generator=g) + 4.0 * y[:, None].float() * torch.ones(48) / 48 ** 0.5
    groups = torch.arange(n) // 10  # ten tokens a "sentence"
    res = probe.probe_features([layer0, layer1], y, types=types, groups=groups, l2=1e-4)
    r0, r1 = res.rows
    assert r0["accuracy"] > 0.95 and r1["accuracy"] > 0.95
    assert r0["control_accuracy"] > 0.9  # memorizes the type -> label table
    assert abs(r1["control_accuracy"] - 0.5) < 0.1
    assert r1["selectivity"] > 0.35 > r0["selectivity"]


def test_control_labels():
    y = torch.tensor([0, 0, 0, 1, 1, 2] * 50)
    c = probe.control_labels(y, seed=3)
    assert torch.equal(torch.bincount(c), torch.bincount(y)) and not torch.equal(c, y)
    types = torch.tensor([5, 7, 5, 9, 7, 5] * 50)
    c = probe.control_labels(y, types, seed=3)
    for t in (5, 7, 9):  # one label per word type, from the label set
        assert len(torch.unique(c[types == t])) == 1
    assert set(c.tolist()) <= {0, 1, 2}
    assert torch.equal(c, probe.control_labels(y, types, seed=3))  # deterministic


def test_split_never_cuts_an_example():
    groups = torch.arange(100).repeat_interleave(3)
    tr, te = probe.split(groups, 0.2, seed=0)
    assert len(te) == 60 and len(tr) == 240
    assert not set(groups[tr].tolist()) & set(groups[te].tolist())


def batches_for(model_vocab, n_batches=3, B=8, T=7, token=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, model_vocab, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[: B // 2, T - 2:] = 0  # some right padding
        labels = ids % 2 if token else torch.randint(2, (B,), generator=g)
        if token:
            labels = labels.masked_fill(mask == 0, -100)
            labels[:, 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_run_probe_on_a_model(tiny_classifier, pooling):
    tiny_classifier.train()
    before = {k: v.clone() for k, v in tiny_classifier.state_dict().items()}
    res = probe.run_probe(tiny_classifier, batches_for(99), pooling=pooling, max_iter=20)
    assert [r["layer"] for r in res.rows] == [0, 1, 2]  # embeddings + 2 blocks
    assert res.n_train + res.n_test == 24 and res.pooling == pooling
    assert all(0 <= r["accuracy"] <= 1 and r["control_accuracy"] is not None for r in res.rows)
    assert tiny_classifier.training  # mode restored
    assert all(torch.equal(v, tiny_classifier.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in tiny_classifier.parameters())


def test_features_match_hidden_states(tiny_gpt):
    bs = batches_for(97, n_batches=1)
    feats = probe.extract_features(tiny_gpt, bs, pooling="mean", layers=[2])
    hs = tiny_gpt(bs[0]["input_ids"], attention_mask=bs[0]["attention_mask"], output_hidden_states=True).hidden_states
    m = bs[0]["attention_mask"].float()[..., None]
    torch.testing.assert_close(feats[0], (hs[2] * m).sum(1) / m.sum(1))
    last = probe.extract_features(tiny_gpt, bs, pooling="last", layers=[1])[0]
    torch.testing.assert_close(last[0], hs[1][0, 4])  # padded row: last real token at 4
    torch.testing.assert_close(last[-1], hs[1][-1, 6])


def test_token_probe_on_gpt(tiny_gpt):
    bs = batches_for(97, token=True)
    feats = probe.extract_features(tiny_gpt, bs, pooling="token")
    labels, types, groups = probe.batch_labels(bs, "token")
    n_labelled = sum(int((b["labels"] != -100).sum()) for b in bs)
    assert len(feats) == 3 and all(f.shape == (n_labelled, 32) for f in feats)
    assert labels.shape == types.shape == groups.shape == (n_labelled,)
    assert torch.equal(labels, types % 2)
    res = probe.run_probe(tiny_gpt, bs, pooling="token", layers=[0, 2], max_iter=30)
    assert [r["layer"] for r in res.rows] == [0, 2]
    assert res.rows[0]["accuracy"] > 0.9  # the embedding layer knows the token, hence its parity


def test_bad_input(tiny_bert):
    bs = batches_for(99, n_batches=1)
    with pytest.raises(ValueError, match=r"layer 5 does not exist: the model has hidden states 0\.\.2"):
        probe.run_probe(tiny_bert, bs, layers=[0, 5])
    with pytest.raises(ValueError, match="layer -1 does not exist"):
        probe.extract_features(tiny_bert, bs, layers=[-1])
    with pytest.raises(ValueError, match="pooling must be one of cls, mean, last, token"):
        probe.extract_features(tiny_bert, bs, pooling="max")
    with pytest.raises(ValueError, match=r"needs labels of shape \(B, T\)"):
        probe.run_probe(tiny_bert, bs, pooling="token")
    with pytest.raises(ValueError, match="batches is empty"):
        probe.extract_features(tiny_bert, [])
    with pytest.raises(ValueError, match="GPT, Llama, Bert and BertClassifier"):
        probe.extract_features(torch.nn.Linear(2, 2), bs)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        probe.probe_features([torch.randn(10, 2)], torch.arange(10) % 2, test_fraction=1.0)


def test_result_outputs(tmp_path):
    feats, y = synthetic(n=300, n_layers=3, informative=1)
    res = probe.probe_features(feats, y, meta={"model": "synthetic"})
    path = tmp_path / "r.json"
    text = res.to_json(path)
    back = ProbeResult(**json.loads(path.read_text()))
    assert back == res and json.loads(text)["meta"] == {"model": "synthetic"}
    md = res.to_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| layer | accuracy | macro-F1 | control acc. | selectivity |")
    assert len([ln for ln in lines if ln.startswith("| ") and ln[2].isdigit()]) == 3
    r1 = res.rows[1]
    assert f"| 1 | {100 * r1['accuracy']:.1f} | {100 * r1['f1']:.1f} |" in md
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    res.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_dir(tmp_path):
    """A tiny BERT checkpoint with a word-level tokenizer.json, and a sentiment-like .jsonl file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from minift.models.bert import Bert, BertConfig
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "the", "a", "plot", "very", "not"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    torch.manual_seed(0)
    model_dir = tmp_path / "m"
    Bert(BertConfig(vocab_size=len(words), max_position_embeddings=32, n_layer=2, n_head=2, n_embd=16,
                    n_inner=32)).save_pretrained(model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(60):
        pos = i % 2 == 0
        filler = " ".join(words[4 + int(j)] for j in torch.randint(2, 8, (4,), generator=g))
        lines.append(json.dumps({"text": f"{'good' if pos else 'bad'} {filler}", "label": "pos" if pos else "neg"}))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return model_dir, data


def test_cli_probe(tmp_path, capsys):
    from minift.cli import main
    model_dir, data = _tiny_dir(tmp_path)
    out = tmp_path / "out"
    args = ["probe", "--model", str(model_dir), "--data", str(data), "--max-len", "12", "--pooling", "mean"]
    assert main(args + ["--out", str(out), "--limit", "50"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("| layer | accuracy |") and "| 2 |" in stdout
    res = json.loads((out / "probe.json").read_text())
    assert [r["layer"] for r in res["rows"]] == [0, 1, 2] and res["meta"]["examples"] == 50
    assert res["rows"][0]["accuracy"] > 0.8  # the first word decides the label; the embeddings see it
    assert (out / "probe.md").read_text() == stdout
    assert main(args + ["--layers", "0,9"]) == 2
    assert "error: layer 9 does not exist: the model has hidden states 0..2" in capsys.readouterr().err
    assert main(args + ["--layers", "a"]) == 2
    assert "--layers must be comma-separated integers" in capsys.readouterr().err
