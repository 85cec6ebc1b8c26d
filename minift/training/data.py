"""Data: readers, tokenization and batching (the fetchers of real data live in fetch.py).

    file --read--> records --tokenize--> examples --batches--> [batch dict, ...]
    .jsonl/.csv    dicts                 lists of ids          padded tensors, fixed once
    .txt           one text              (no padding yet)      (train.py permutes their order)

Readers fail on malformed input with one line ``file:line: what is wrong`` (``DataError``, a
ValueError, so the CLI exits 2): invalid JSON, an empty file, a missing field, a label not
seen in training. Batches follow minift's convention (``forward.model_forward``):
``input_ids`` (B, T), ``attention_mask`` (B, T) with 1 on real tokens, ``labels`` — (B,)
class ids for classification, (B, T) aligned with ``input_ids`` for causal LM and
prompt/completion (-100 = no loss; the model shifts) — and ``token_type_ids`` for BERT
sentence pairs. Padding is dynamic (to the longest example of a batch) and on the right.

The fetchers of real weights and data live in ``minift/fetch.py`` and are re-exported here
(``cache_dir, fetch_minilm, fetch_sentiment, FetchError``).
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from minift.training.fetch import FetchError, cache_dir, fetch_minilm, fetch_sentiment  # noqa: F401 (the data API)
from minift.files import InputError

IGNORE = -100  # label value that gets no loss


class DataError(InputError):
    """Malformed input data; the message names the file, the line and the field."""


# ---------------------------------------------------------------------------- reading records

def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None


def _jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{i}: JSON nested too deeply") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        rows.append((i, rec))
    return rows


def _csv(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, start = [], 2
    try:
        header = next(reader, None)
        if header is None:
            return []
        for row in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span lines
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} values, but the header has {len(header)} columns")
            rows.append((line, dict(zip(header, row))))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def _numbered(path, fields=()) -> list[tuple[int, dict]]:
    """(line number, record) pairs of a .jsonl or .csv file; every record has ``fields``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    kind = path.suffix.lower()
    if kind not in (".jsonl", ".csv"):
        raise DataError(f"{path}: unsupported file type {kind or '(none)'!r}; records are read from .jsonl or .csv")
    text = _read_utf8(path)
    rows = _jsonl(path, text) if kind == ".jsonl" else _csv(path, text)
    if not rows:
        raise DataError(f"{path}: file is empty (no records)")
    for line, rec in rows:
        for f in fields:
            if rec.get(f) is None:
                raise DataError(f"{path}:{line}: missing field {f!r} (the record has: {', '.join(map(str, rec))})")
    return rows


def read_records(path, fields=()) -> list[dict]:
    """The records of a .jsonl (one JSON object a line) or .csv (a header row) file."""
    return [rec for _, rec in _numbered(path, fields)]


def _string(path, line: int, rec: dict, field: str) -> str:
    v = rec[field]
    if not isinstance(v, str):
        raise DataError(f"{path}:{line}: field {field!r} must be a string, got {json.dumps(v)}")
    return v


def _label_key(path, line: int, v, field: str) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, str) and v.strip():
        return v.strip()
    raise DataError(f"{path}:{line}: field {field!r} must be a non-empty string or an integer, got {json.dumps(v)}")


# ---------------------------------------------------------------------------- classification

@dataclass
class ClassificationData:
    texts: list[str]
    labels: list[int]             # class ids, through label2id
    label2id: dict[str, int]      # label (as a string: "positive", "3") -> class id
    pairs: list[str] | None = None  # second sentences, for sentence-pair tasks

    @property
    def num_labels(self) -> int:
        return len(self.label2id)

    @property
    def id2label(self) -> dict[int, str]:
        return {i: k for k, i in self.label2id.items()}

    def tokenize(self, tokenizer: Tokenizer, max_length: int = 128) -> list[dict]:
        """Examples ``{input_ids, labels[, token_type_ids]}`` with the tokenizer's special tokens,
        truncated to ``max_length`` (longest sentence first, for pairs)."""
        tok = _plain(tokenizer, max_length)
        inputs = self.texts if self.pairs is None else list(zip(self.texts, self.pairs))
        out = []
        for enc, label in zip(tok.encode_batch(inputs), self.labels):
            ex = {"input_ids": enc.ids, "labels": label}
            if self.pairs is not None:
                ex["token_type_ids"] = enc.type_ids
            out.append(ex)
        return out


def read_classification(path, label2id: dict | None = None, text_field: str = "text",
                        pair_field: str = "text_pair", label_field: str = "label") -> ClassificationData:
    """Read a classification file. Labels may be strings or integers. Without ``label2id``
    (the training file) the distinct labels, sorted (numerically when all are integers, so
    0/1 labels keep their values), get ids 0..K-1; with it (dev/test files, the training
    file's mapping) a label it lacks is an error naming the file and line. The file is a
    sentence-pair task when any record has ``pair_field``; then every record needs it."""
    rows = _numbered(path, (text_field, label_field))
    has_pair = any(pair_field in rec for _, rec in rows)
    texts, pairs, keys = [], [], []
    for line, rec in rows:
        texts.append(_string(path, line, rec, text_field))
        if has_pair:
            if rec.get(pair_field) is None:
                raise DataError(f"{path}:{line}: missing field {pair_field!r} (other records have it)")
            pairs.append(_string(path, line, rec, pair_field))
        keys.append((line, _label_key(path, line, rec[label_field], label_field)))
    if label2id is None:
        seen = {k for _, k in keys}
        numeric = all(re.fullmatch(r"-?\d+", k) for k in seen)
        label2id = {k: i for i, k in enumerate(sorted(seen, key=int if numeric else str))}
        if len(label2id) < 2:
            raise DataError(f"{path}: only one label ({next(iter(seen))!r}); classification needs at least 2")
    label2id = {str(k): int(v) for k, v in label2id.items()}
    labels = []
    for line, k in keys:
        if k not in label2id:
            raise DataError(f"{path}:{line}: label {k!r} in field {label_field!r} was not seen in training "
                            f"(known: {', '.join(label2id)})")
        labels.append(label2id[k])
    return ClassificationData(texts, labels, label2id, pairs if has_pair else None)


# ---------------------------------------------------------------------------- causal LM, prompt/completion

def lm_examples(path, tokenizer: Tokenizer, block_size: int) -> list[dict]:
    """A plain-text (.txt) file tokenized as one stream and cut into blocks of ``block_size``
    tokens (the last, shorter block is kept when it has at least 2). Labels = input_ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() != ".txt":
        raise DataError(f"{path}: causal LM data is read from a plain .txt file")
    if block_size < 2:
        raise DataError(f"block_size must be >= 2, got {block_size}")
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    ids = _plain(tokenizer).encode(text, add_special_tokens=False).ids
    blocks = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) >= 2]


def read_prompt_completion(path, prompt_field: str = "prompt",
                           completion_field: str = "completion") -> list[tuple[str, str]]:
    rows = _numbered(path, (prompt_field, completion_field))
    return [(_string(path, ln, r, prompt_field), _string(path, ln, r, completion_field)) for ln, r in rows]


def prompt_completion_examples(pairs: list[tuple[str, str]], tokenizer: Tokenizer, max_length: int,
                               eos_id: int | None = None) -> list[dict]:
    """``prompt + completion (+ eos)`` with labels -100 on the prompt: the loss is on the
    completion only. Prompt and completion are tokenized separately (no special tokens) and
    joined. Too long: the completion keeps at most ``max_length - 1`` tokens and the prompt
    its last tokens (those next to the completion) that still fit."""
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    tok = _plain(tokenizer)
    p_ids = tok.encode_batch([p for p, _ in pairs], add_special_tokens=False)
    c_ids = tok.encode_batch([c for _, c in pairs], add_special_tokens=False)
    out = []
    for p, c in zip(p_ids, c_ids):
        c = (c.ids + ([eos_id] if eos_id is not None else []))[:max_length - 1]
        p = p.ids[len(p.ids) - (max_length - len(c)):] if len(p.ids) + len(c) > max_length else p.ids
        out.append({"input_ids": p + c, "labels": [IGNORE] * len(p) + c})
    return out


# ---------------------------------------------------------------------------- tokenizers and batching

def load_tokenizer(path) -> Tokenizer:
    """``tokenizer.json`` of a model directory (or the file itself), with any fixed padding
    and truncation it carries switched off: minift pads per batch and truncates explicitly."""
    path = Path(path)
    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json (minift reads tokenizers in the "
                                f"Hugging Face `tokenizers` JSON format)")
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # the Rust side raises plain Exceptions
        raise DataError(f"{f}: not a readable tokenizer ({e})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def _plain(tokenizer: Tokenizer, max_length: int | None = None) -> Tokenizer:
    """A copy without padding, truncated to ``max_length`` (the caller's tokenizer is untouched)."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    elif max_length < tok.num_special_tokens_to_add(True) + 2:
        raise DataError(f"max_length {max_length} is too small for this tokenizer's special tokens")
    else:
        tok.enable_truncation(max_length)
    return tok


def special_id(tokenizer: Tokenizer, *tokens: str) -> int | None:
    """The id of the first of ``tokens`` the tokenizer knows, else None."""
    for t in tokens:
        i = tokenizer.token_to_id(t)
        if i is not None:
            return i
    return None


def pad_id(tokenizer: Tokenizer) -> int:
    """Padding id: [PAD] / <pad>, else GPT-2's <|endoftext|>, else 0 (padded slots are masked anyway)."""
    i = special_id(tokenizer, "[PAD]", "<pad>", "<|endoftext|>")
    return 0 if i is None else i


def eos_id(tokenizer: Tokenizer) -> int | None:
    """End-of-text id (<|endoftext|>, </s>, [SEP]), for prompt/completion examples."""
    return special_id(tokenizer, "<|endoftext|>", "</s>", "[SEP]")


def collate(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of examples on the right to its longest one: the batch dict of the convention."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in examples[0]:
        tt = torch.zeros(B, T, dtype=torch.long)
        for i, e in enumerate(examples):
            tt[i, :len(e["token_type_ids"])] = torch.tensor(e["token_type_ids"])
        batch["token_type_ids"] = tt
    if "labels" in examples[0]:
        if isinstance(examples[0]["labels"], int):
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)  # (B,)
        else:
            labels = torch.full((B, T), IGNORE, dtype=torch.long)
            for i, e in enumerate(examples):
                labels[i, :len(e["labels"])] = torch.tensor(e["labels"])
            batch["labels"] = labels  # (B, T)
    return batch


def pad_batch(batch: dict[str, torch.Tensor], length: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` padded on the right to ``length`` tokens, as ``collate`` pads: ``pad_id`` in
    ``input_ids``, 0 in ``attention_mask`` and ``token_type_ids``, IGNORE in per-token labels.
    A batch already that long is returned as it is; a longer one is a ValueError."""
    B, T = batch["input_ids"].shape
    if T > length:
        raise ValueError(f"a batch of {T} tokens cannot be padded to {length}")
    if T == length:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}
    out = _with_mask(batch)
    for k, v in out.items():
        if k in fill and v.dim() == 2:
            out[k] = torch.cat([v, v.new_full((B, length - T), fill[k])], dim=1)
    return out


def pad_to_longest(batches: list[dict], pad_id: int = 0) -> list[dict]:
    """Every batch padded (``pad_batch``) to the longest one's sequence length."""
    longest = max(b["input_ids"].shape[1] for b in batches)
    return [pad_batch(b, longest, pad_id) for b in batches]


def pad_to_one_shape(batches: list[dict], pad_id: int = 0) -> list[dict]:
    """Every batch padded to the longest one's length and, with ``pad_rows``, to the most rows,
    each with an attention mask: one shape for all, so that a compiled step is captured once (an
    epoch's last, short batch would otherwise compile and capture again). Batches with float
    labels keep their rows."""
    rows = max(b["input_ids"].shape[0] for b in batches)
    return [pad_rows(b, rows, pad_id) for b in pad_to_longest([_with_mask(b) for b in batches], pad_id)]


def pad_rows(batch: dict[str, torch.Tensor], rows: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` with rows added up to ``rows``, each one attended ``pad_id`` token with no label
    (IGNORE): the mean loss over labelled rows or tokens, and so every gradient, is unchanged
    (exactly without dropout; with dropout the added rows draw masks too, so later draws differ).
    A mean squared error over float labels would change: such a batch is returned as it is."""
    B = batch["input_ids"].shape[0]
    labels = batch.get("labels")
    if B >= rows or (labels is not None and labels.is_floating_point()):
        return batch
    out = _with_mask(batch)
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}
    for k, v in out.items():
        if k in fill:
            extra = v.new_full((rows - B, *v.shape[1:]), fill[k])
            if k == "attention_mask":
                extra[:, 0] = 1  # one token to attend to: no row of the attention is fully masked
            out[k] = torch.cat([v, extra])
    return out


def _with_mask(batch: dict) -> dict:
    """A copy of ``batch`` with an attention mask (all ones when it had none: no padding yet)."""
    out = dict(batch)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(batch["input_ids"])
    return out


def batches(examples: list[dict], batch_size: int, shuffle: bool = False, seed: int = 0,
            pad_id: int = 0) -> list[dict]:
    """Collate ``examples`` into a list of batch dicts (the last one may be smaller). With
    ``shuffle`` the examples are permuted once, seeded, before grouping; ``train`` then
    permutes the order of the batches each epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise DataError("no examples to batch")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [collate([examples[j] for j in order[i:i + batch_size]], pad_id)
            for i in range(0, len(order), batch_size)]
