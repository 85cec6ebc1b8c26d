"""Readers, tokenization and batching. A tiny word-level tokenizer is built here, so nothing
touches the network (the fetch tests are in test_fetch.py)."""
import json

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from minift.training import data
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig
from minift.training.loop import model_forward

SENTENCES = ["the movie was great", "the plot was dull", "a great cast", "dull and slow",
             "what a movie", "slow but great"]


def word_tokenizer(bert=True) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, records):
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------------------- readers and their errors

def test_read_records_jsonl_and_csv(tmp_path):
    recs = [{"text": "a, \"quoted\"\nline", "label": "x"}, {"text": "b", "label": "y"}]
    assert data.read_records(jsonl(tmp_path / "d.jsonl", recs)) == recs
    f = write(tmp_path / "d.csv", 'text,label\n"a, ""quoted""\nline",x\n\nb,y\n')
    assert data.read_records(f) == recs
    # line numbers count physical lines: the quoted record spans lines 2-3, the blank is 4, "b" is 5
    write(f, 'text,label\n"a\nb",x\n\nb\n')
    with pytest.raises(data.DataError, match=r"d\.csv:5: 1 values, but the header has 2 columns"):
        data.read_records(f)


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 1}\n', r"d\.jsonl:2: invalid JSON"),
    ("d.jsonl", '{"text": "a", "label": 1}\n\n[1, 2]\n', r"d\.jsonl:3: expected a JSON object, got list"),
    ("d.jsonl", "\n  \n", r"d\.jsonl: file is empty"),
    ("d.csv", "text,label\n", r"d\.csv: file is empty"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 1}\n',
     r"d\.jsonl:2: missing field 'text' \(the record has: txt, label\)"),
    ("d.jsonl", '{"text": "a", "label": null}\n', r"d\.jsonl:1: missing field 'label'"),
    ("d.csv", "sentence,label\nhi,1\n", r"d\.csv:2: missing field 'text'"),
    ("d.jsonl", '{"text": 3, "label": 1}\n', r"d\.jsonl:1: field 'text' must be a string, got 3"),
    ("d.jsonl", '{"text": "a", "label": 1.5}\n', r"d\.jsonl:1: field 'label' must be a non-empty string or an integer"),
    ("d.csv", "text,label\na,\n", r"d\.csv:2: field 'label' must be a non-empty string"),
    ("d.json", '{"text": "a"}', r"d\.json: unsupported file type '\.json'"),
])
def test_malformed_input_names_file_line_and_field(tmp_path, name, content, message):
    with pytest.raises(data.DataError, match=message) as e:
        data.read_classification(write(tmp_path / name, content))
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)  # the CLI prints it as one line


def test_invalid_utf8_and_missing_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 1}\n')
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        data.read_records(f)
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        data.read_records(tmp_path / "nope.jsonl")


def test_labels_strings_ints_and_unseen(tmp_path):
    train = data.read_classification(jsonl(tmp_path / "t.jsonl", [
        {"text": "a", "label": 10}, {"text": "b", "label": "2"}, {"text": "c", "label": 2}]))
    assert train.label2id == {"2": 0, "10": 1}  # numeric order, JSON 2 and "2" are one label
    assert train.labels == [1, 0, 0] and train.id2label == {0: "2", 1: "10"} and train.num_labels == 2
    words = data.read_classification(write(tmp_path / "w.csv", "text,label\nx,pos\ny,neg\nz,pos\n"))
    assert words.label2id == {"neg": 0, "pos": 1} and words.labels == [1, 0, 1]
    dev = data.read_classification(write(tmp_path / "d.csv", "text,label\nx,neg\n"), label2id=words.label2id)
    assert dev.labels == [0]
    with pytest.raises(data.DataError, match=r"d\.csv:3: label 'neutral' in field 'label' was not seen in training "
                                             r"\(known: neg, pos\)"):
        data.read_classification(write(tmp_path / "d.csv", "text,label\nx,neg\ny,neutral\n"), words.label2id)
    with pytest.raises(data.DataError, match="only one label"):
        data.read_classification(write(tmp_path / "one.csv", "text,label\nx,neg\ny,neg\n"))


def test_custom_fields_and_pairs(tmp_path):
    d = data.read_classification(jsonl(tmp_path / "p.jsonl", [
        {"q": "the movie", "a": "was great", "y": "yes"}, {"q": "the plot", "a": "dull", "y": "no"}]),
        text_field="q", pair_field="a", label_field="y")
    assert d.texts == ["the movie", "the plot"] and d.pairs == ["was great", "dull"] and d.labels == [1, 0]
    with pytest.raises(data.DataError, match=r"p\.jsonl:2: missing field 'text_pair' \(other records have it\)"):
        data.read_classification(jsonl(tmp_path / "p.jsonl", [
            {"text": "a", "text_pair": "b", "label": 0}, {"text": "a", "label": 1}]))


# ---------------------------------------------------------------------------- tokenization and batches

def test_classification_tokenize_truncate_and_collate(tmp_path):
    tok = word_tokenizer()
    cls_, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    d = data.read_classification(jsonl(tmp_path / "p.jsonl", [
        {"text": "the movie was great", "text_pair": "a great cast", "label": "pos"},
        {"text": "dull", "text_pair": "slow", "label": "neg"}]))
    ex = d.tokenize(tok, max_length=8)
    assert [len(e["input_ids"]) for e in ex] == [8, 5]
    # longest first: 4 + 3 words must lose 2 -> 3 + 2 (each time from the longer sentence)
    assert ex[0]["input_ids"] == [cls_, *tok.encode("the movie was", add_special_tokens=False).ids, sep,
                                  *tok.encode("a great", add_special_tokens=False).ids, sep]
    assert ex[0]["token_type_ids"] == [0] * 5 + [1] * 3 and ex[0]["labels"] == 1
    assert tok.truncation is None  # the caller's tokenizer is not changed
    b = data.collate(ex, pad_id=data.pad_id(tok))
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert b["input_ids"].shape == (2, 8) and b["labels"].tolist() == [1, 0]
    assert b["attention_mask"].tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    assert b["input_ids"][1, 5:].tolist() == [tok.token_to_id("[PAD]")] * 3
    assert b["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    torch.manual_seed(0)  # the batch is what BertClassifier takes, through the training loop's forward
    model = BertClassifier(BertConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=16, n_layer=1,
                                      n_head=2, n_embd=16, n_inner=32, dropout=0.0), num_labels=2).eval()
    out = model_forward(model, b)
    assert out.logits.shape == (2, 2) and torch.allclose(out.loss, F.cross_entropy(out.logits, b["labels"]))
    single = data.read_classification(jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}]))
    assert "token_type_ids" not in single.tokenize(tok)[0]
    with pytest.raises(data.DataError, match="too small"):
        d.tokenize(tok, max_length=3)


def test_batches_cover_every_example_once():
    ex = [{"input_ids": [i] * (1 + i % 3), "labels": i} for i in range(10)]
    plain = data.batches(ex, 4)
    assert [b["labels"].tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuf = data.batches(ex, 4, shuffle=True, seed=3)
    got = [b["labels"].tolist() for b in shuf]
    assert sorted(sum(got, [])) == list(range(10)) and got != [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert got == [b["labels"].tolist() for b in data.batches(ex, 4, shuffle=True, seed=3)]
    for b in shuf:  # each row's mask matches its own length, ids are the label repeated
        for row, m, y in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            assert m.sum() == 1 + y % 3 and row[:m.sum()].eq(y).all()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.batches(ex, 0)


def test_lm_blocks(tmp_path):
    tok = word_tokenizer(bert=False)
    f = write(tmp_path / "c.txt", " ".join(SENTENCES * 3))
    ids = tok.encode(f.read_text()).ids
    ex = data.lm_examples(f, tok, block_size=5)
    assert [len(e["input_ids"]) for e in ex[:-1]] == [5] * (len(ex) - 1) and len(ex[-1]["input_ids"]) >= 2
    kept = ids[:-1] if len(ids) % 5 == 1 else ids  # a last block of 1 token has nothing to predict
    assert sum((e["input_ids"] for e in ex), []) == kept
    assert all(e["labels"] == e["input_ids"] for e in ex)
    b = data.collate(ex)
    assert b["labels"][-1, len(ex[-1]["input_ids"]):].eq(-100).all()
    with pytest.raises(data.DataError, match=r"e\.txt: file is empty"):
        data.lm_examples(write(tmp_path / "e.txt", " \n"), tok, 8)
    with pytest.raises(data.DataError, match="plain .txt"):
        data.lm_examples(write(tmp_path / "c.jsonl", "{}"), tok, 8)


def test_prompt_completion_loss_only_on_completion(tmp_path):
    tok = word_tokenizer(bert=False)
    pairs = data.read_prompt_completion(jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "the movie was", "completion": "great"}, {"prompt": "dull", "completion": "and slow"}]))
    eos = data.eos_id(tok)
    assert eos == tok.token_to_id("[SEP]")
    ex = data.prompt_completion_examples(pairs, tok, max_length=16, eos_id=eos)
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    assert ex[0]["input_ids"] == enc("the movie was") + enc("great") + [eos]
    assert ex[0]["labels"] == [-100] * 3 + enc("great") + [eos]
    # truncation: the completion keeps max_length - 1 tokens, the prompt its end
    short = data.prompt_completion_examples([("the movie was", "dull and slow")], tok, max_length=3)[0]
    assert short["input_ids"] == enc("was") + enc("dull and") and short["labels"] == [-100] + enc("dull and")
    # the model's loss is the cross-entropy of the completion tokens alone
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    batch = data.collate(ex, pad_id=data.pad_id(tok))
    loss = model_forward(model, batch).loss
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = [F.cross_entropy(logits[i, t - 1], batch["input_ids"][i, t], reduction="sum")
             for i, e in enumerate(ex) for t in range(len(e["labels"])) if e["labels"][t] != -100]
    assert len(terms) == 2 + 3 and torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)


def test_load_tokenizer(tmp_path):
    tok = word_tokenizer()
    tok.enable_padding(length=32)
    tok.enable_truncation(32)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = data.load_tokenizer(tmp_path)
    assert loaded.padding is None and loaded.truncation is None
    assert loaded.encode("the movie").ids == word_tokenizer().encode("the movie").ids
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        data.load_tokenizer(tmp_path / "sub")
    with pytest.raises(data.DataError, match="not a readable tokenizer"):
        data.load_tokenizer(write(tmp_path / "bad.json", "{}"))
