"""Prefix tuning and prompt tuning: PEFT parity (logits and files, both ways), gradients,
export, generation with a cache, training, bad input."""
import math

import pytest
import torch

from conftest import TINY_BERT, TINY_GPT, hf_bert, hf_gpt2
from minift import adapters
from minift.methods import prefix, prompt
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig
from minift.training.loop import model_forward

P = 4


def _batch(B=2, T=7, vocab=97, seed=1, bert=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0  # right padding on the second row
    if not bert:
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt,
            "labels": torch.randint(0, 3, (B,), generator=g)}


def _peft(model, kind, task, **kw):
    peft = pytest.importorskip("peft")
    cls = peft.PrefixTuningConfig if kind == "prefix" else peft.PromptTuningConfig
    pm = peft.get_peft_model(model, cls(task_type=task, num_virtual_tokens=P, **kw)).eval()
    with torch.no_grad():  # a prefix/prompt large enough to change the outputs a lot
        for p in pm.prompt_encoder.default.parameters():
            p.normal_(0.0, 0.5)
    return pm


def _hf_classifier(tmp_path):
    hf, d = hf_bert(tmp_path, classifier=True)
    with torch.no_grad():
        hf.classifier.weight.normal_(0.0, 1.0)  # logits of order 1, so a 1e-4 match means something
    hf.save_pretrained(d)
    return hf, d


def _peft_bert_prefix_logits(pm, batch):
    """PEFT's prefix forward for sequence classification, run by hand.

    peft 0.21.2's ``PeftModelForSequenceClassification._prefix_tuning_forward`` looks for a
    parameter named ``past_key_values`` in the model's signature; transformers 5.x renamed it
    ``cache`` (``past_key_values`` is only a deprecated alias), so PEFT raises "Model does not
    support past key values" before running anything. The steps it would run are these:
    the same cache from ``get_prompt``, P ones before the attention mask, token types kept.
    """
    try:
        return pm(**{k: v for k, v in batch.items() if k != "labels"}).logits
    except ValueError as e:
        if "past key values" not in str(e):
            raise
    B = batch["input_ids"].shape[0]
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), batch["attention_mask"]], dim=1)
    return pm.base_model(input_ids=batch["input_ids"], attention_mask=mask,
                         token_type_ids=batch["token_type_ids"], cache=pm.get_prompt(B)).logits


def _close_where_real(a, b, mask, P_front=0):
    keep = torch.cat([torch.ones(mask.shape[0], P_front, dtype=torch.bool), mask.bool()], dim=1)
    torch.testing.assert_close(a[keep], b[keep], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- PEFT parity: logits

@pytest.mark.parametrize("projection", [False, True])
@torch.no_grad()
def test_gpt_prefix_matches_peft(tmp_path, projection):
    hf, d = hf_gpt2(tmp_path)
    pm = _peft(hf, "prefix", "CAUSAL_LM", prefix_projection=projection, encoder_hidden_size=16)
    m = GPT.from_pretrained(d).eval()
    prefix.apply(m, prefix.PrefixConfig(P, projection_dim=16 if projection else None))
    # minift's encoder has PEFT's parameter layout: embedding.weight -> embedding, transform.{0,2}
    theirs = {k.replace("embedding.weight", "embedding"): v for k, v in pm.prompt_encoder.default.state_dict().items()}
    m.prefix_encoder.load_state_dict(theirs)
    b = _batch()
    ref = pm(**b)
    out = model_forward(m, {**b, "labels": None})
    base = GPT.from_pretrained(d).eval()(b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (out.logits - base).abs().max() > 0.1  # the prefix matters
    _close_where_real(out.logits, ref.logits, b["attention_mask"])
    torch.testing.assert_close(model_forward(m, b).loss, ref.loss, atol=1e-5, rtol=0)


@torch.no_grad()
def test_gpt_prompt_matches_peft(tmp_path):
    hf, d = hf_gpt2(tmp_path)
    pm = _peft(hf, "prompt", "CAUSAL_LM")
    m = GPT.from_pretrained(d).eval()
    prompt.apply(m, prompt.PromptConfig(P))
    m.soft_prompt.embedding.copy_(pm.prompt_encoder.default.embedding.weight)
    b = _batch()
    ref = pm(**b)
    out = model_forward(m, {**b, "labels": None})
    assert out.logits.shape == ref.logits.shape == (2, P + 7, 97)
    _close_where_real(out.logits, ref.logits, b["attention_mask"], P_front=P)
    torch.testing.assert_close(model_forward(m, b).loss, ref.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
@torch.no_grad()
def test_bert_classifier_matches_peft(tmp_path, kind):
    hf, d = _hf_classifier(tmp_path)
    pm = _peft(hf, kind, "SEQ_CLS")
    m = BertClassifier.from_pretrained(d).eval()
    method = prefix if kind == "prefix" else prompt
    cfg = (prefix.PrefixConfig if kind == "prefix" else prompt.PromptConfig)(P, modules_to_save=("classifier",))
    method.apply(m, cfg)
    (m.prefix_encoder if kind == "prefix" else m.soft_prompt).embedding.copy_(
        pm.prompt_encoder.default.embedding.weight)
    b = _batch(vocab=99, bert=True)
    ref = (_peft_bert_prefix_logits(pm, b) if kind == "prefix"
           else pm(**{k: v for k, v in b.items() if k != "labels"}).logits)
    out = model_forward(m, b)
    base = BertClassifier.from_pretrained(d).eval()(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits
    assert (out.logits - base).abs().max() > 0.05  # the prefix/prompt matters
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- PEFT parity: files

def _minift_logits(m, b):
    with torch.no_grad():
        return model_forward(m, {**b, "labels": None}).logits


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_gpt_peft_files_load_both_ways(tmp_path, kind):
    peft = pytest.importorskip("peft")
    hf, d = hf_gpt2(tmp_path / "base")
    pm = _peft(hf, kind, "CAUSAL_LM", **({"prefix_projection": True, "encoder_hidden_size": 16}
                                          if kind == "prefix" else {}))
    b = _batch()
    with torch.no_grad():
        ref = pm(**b).logits
    pm.save_pretrained(tmp_path / "peft")  # PEFT writes the MLP's output table
    m = adapters.load_adapter(GPT.from_pretrained(d).eval(), tmp_path / "peft")
    front = P if kind == "prompt" else 0
    _close_where_real(_minift_logits(m, b), ref, b["attention_mask"], front)

    # the reverse: minift (reparameterized prefix / prompt) -> PEFT file -> PEFT model
    m2 = GPT.from_pretrained(d).eval()
    if kind == "prefix":
        prefix.apply(m2, prefix.PrefixConfig(P, projection_dim=8))
    else:
        prompt.apply(m2, prompt.PromptConfig(P, init="vocab"))
    adapters.save_adapter(m2, tmp_path / "mine", layout="peft")
    hf2, _ = hf_gpt2(tmp_path / "base2")
    pm2 = peft.PeftModel.from_pretrained(hf2, tmp_path / "mine").eval()
    with torch.no_grad():
        theirs = pm2(**b).logits
    _close_where_real(_minift_logits(m2, b), theirs, b["attention_mask"], front)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_bert_peft_files_load_both_ways(tmp_path, kind):
    peft = pytest.importorskip("peft")
    hf, d = _hf_classifier(tmp_path / "base")
    pm = _peft(hf, kind, "SEQ_CLS")
    with torch.no_grad():
        pm.base_model.classifier.modules_to_save.default.weight.normal_(0.0, 1.0)  # a trained head
    b = _batch(vocab=99, bert=True)
    run = (lambda model: _peft_bert_prefix_logits(model, b)) if kind == "prefix" else \
        (lambda model: model(**{k: v for k, v in b.items() if k != "labels"}).logits)
    with torch.no_grad():
        ref = run(pm)
    pm.save_pretrained(tmp_path / "peft")
    m = adapters.load_adapter(BertClassifier.from_pretrained(d).eval(), tmp_path / "peft")
    torch.testing.assert_close(_minift_logits(m, b), ref, atol=1e-4, rtol=0)
    assert m.classifier.weight.requires_grad  # the head came back as a module to save

    with torch.no_grad():  # the reverse: change prompt and head in minift, save, load with PEFT
        (m.prefix_encoder if kind == "prefix" else m.soft_prompt).embedding.mul_(-1.0)
        m.classifier.bias.add_(0.5)
    adapters.save_adapter(m, tmp_path / "mine", layout="peft")
    hf2, _ = _hf_classifier(tmp_path / "base2")
    pm2 = peft.PeftModel.from_pretrained(hf2, tmp_path / "mine").eval()
    with torch.no_grad():
        torch.testing.assert_close(run(pm2), _minift_logits(m, b), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_minift_layout_round_trip_is_exact(tmp_path, kind, tiny_classifier):
    torch.manual_seed(3)
    if kind == "prefix":
        prefix.apply(tiny_classifier, prefix.PrefixConfig(P, projection_dim=8, modules_to_save="classifier"))
    else:
        prompt.apply(tiny_classifier, prompt.PromptConfig(P, modules_to_save="classifier"))
    adapters.save_adapter(tiny_classifier, tmp_path, layout="minift")
    torch.manual_seed(0)
    fresh = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3).eval()
    adapters.load_adapter(fresh, tmp_path)
    b = _batch(vocab=99, bert=True)
    assert torch.equal(_minift_logits(fresh, b), _minift_logits(tiny_classifier, b))
    if kind == "prefix":
        assert fresh.prefix_encoder.transform is not None  # the MLP is kept, training can resume


def test_reparameterized_prefix_refuses_a_peft_table(tmp_path, tiny_gpt):
    prefix.apply(tiny_gpt, prefix.PrefixConfig(P))
    adapters.save_adapter(tiny_gpt, tmp_path, layout="peft")
    torch.manual_seed(0)
    other = GPT(GPTConfig(**TINY_GPT)).eval()
    prefix.apply(other, prefix.PrefixConfig(P, projection_dim=8))
    with pytest.raises(ValueError, match="reparameterized"):
        adapters.load_adapter(other, tmp_path)
    prefix.export(other)
    adapters.load_adapter(other, tmp_path)
    assert torch.equal(other.prefix_encoder.embedding, tiny_gpt.prefix_encoder.embedding)


@pytest.mark.parametrize("layout", ["peft", "minift"])
def test_failed_load_leaves_the_model_as_it_was(tmp_path, layout, tiny_classifier):
    prompt.apply(tiny_classifier, prompt.PromptConfig(P, modules_to_save="classifier"))
    adapters.save_adapter(tiny_classifier, tmp_path, layout=layout)
    other = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=2)  # a 2-label head
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"classifier\.(weight|bias).* has shape"):
        adapters.load_adapter(other, tmp_path)
    assert getattr(other, "soft_prompt", None) is None
    assert all(p.requires_grad for p in other.parameters())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------- gradients, export

@pytest.mark.parametrize("kind", ["prefix", "prefix_mlp", "prompt"])
def test_only_virtual_tokens_and_head_get_gradients(kind, tiny_classifier):
    if kind == "prompt":
        names = prompt.apply(tiny_classifier, prompt.PromptConfig(P, modules_to_save=("classifier",)))
    else:
        names = prefix.apply(tiny_classifier, prefix.PrefixConfig(
            P, projection_dim=8 if kind == "prefix_mlp" else None, modules_to_save=("classifier",)))
    model_forward(tiny_classifier, _batch(vocab=99, bert=True)).loss.backward()
    got = {n for n, p in tiny_classifier.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in tiny_classifier.named_parameters() if p.requires_grad}
    assert got == trainable == set(names)
    assert {"classifier.weight", "classifier.bias"} <= got
    assert all(n.startswith(("prefix_encoder.", "soft_prompt.", "classifier.")) for n in got)


def test_adapters_add_keys_and_rename_none(tiny_gpt):
    before = set(tiny_gpt.state_dict())
    prefix.apply(tiny_gpt, prefix.PrefixConfig(P, projection_dim=8))
    after = set(tiny_gpt.state_dict())
    assert before < after and all(k.startswith("prefix_encoder.") for k in after - before)
    torch.manual_seed(0)
    g = GPT(GPTConfig(**TINY_GPT))
    prompt.apply(g, prompt.PromptConfig(P))
    assert set(g.state_dict()) - before == {"soft_prompt.embedding"}  # wte is not duplicated


def test_prefix_layout_per_layer_kv(tiny_gpt):
    prefix.apply(tiny_gpt, prefix.PrefixConfig(P))
    enc = tiny_gpt.prefix_encoder
    kv = enc(3)
    L, nh, C = 2, 4, 32
    assert len(kv) == L and all(k.shape == v.shape == (3, nh, P, C // nh) for k, v in kv)
    t = enc.embedding.view(P, L, 2, nh, C // nh)  # per token: layer, k|v, head, head_dim
    assert torch.equal(kv[1][0][2, 3, 1], t[1, 1, 0, 3])  # batch 2, head 3, token 1, layer 1 key
    assert torch.equal(kv[0][1][0, 2, 3], t[3, 0, 1, 2])  # layer 0 value


def test_export_collapses_the_mlp_with_identical_outputs(tiny_gpt):
    prefix.apply(tiny_gpt, prefix.PrefixConfig(P, projection_dim=8))
    b = _batch()
    before = _minift_logits(tiny_gpt, b)
    kv_before = tiny_gpt.prefix_encoder(2)
    enc = prefix.export(tiny_gpt)
    assert enc.transform is None and enc.config.projection_dim is None
    assert enc.embedding.shape == (P, 2 * 2 * 32) and enc.embedding.requires_grad
    assert all(torch.equal(a, c) for x, y in zip(kv_before, enc(2)) for a, c in zip(x, y))
    assert torch.equal(_minift_logits(tiny_gpt, b), before)


# ---------------------------------------------------------------------------- generation, init

@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_generation_with_cache_equals_recompute(kind, tiny_gpt):
    b = _batch()
    ids = b["input_ids"]
    if kind == "prefix":
        prefix.apply(tiny_gpt, prefix.PrefixConfig(P, projection_dim=8))
        with torch.no_grad():
            tiny_gpt.prefix_encoder.embedding.normal_(0.0, 2.0)
        kw = {"prefix": tiny_gpt.prefix_encoder(2)}
        args = (ids,)
    else:
        prompt.apply(tiny_gpt, prompt.PromptConfig(P))
        with torch.no_grad():
            kw = {"inputs_embeds": tiny_gpt.soft_prompt.embed(ids)}
        args = (None,)
    cached = tiny_gpt.generate(*args, 8, temperature=0, **kw)
    recomputed = tiny_gpt.generate(*args, 8, temperature=0, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)
    torch.manual_seed(5)  # sampling with a cache follows the same draws as recomputing
    s1 = tiny_gpt.generate(*args, 6, temperature=1.0, top_k=10, **kw)
    torch.manual_seed(5)
    s2 = tiny_gpt.generate(*args, 6, temperature=1.0, top_k=10, use_cache=False, **kw)
    assert torch.equal(s1, s2)


class _CharTokenizer:
    def encode(self, text):
        return [ord(c) % 97 for c in text]


def test_token_init_prefix_is_a_cache_of_those_tokens(tiny_gpt):
    """A prefix initialized from the activations of tokens t is the KV cache of t: running x
    with it equals running [t; x] and keeping the last T positions."""
    t = torch.tensor([_CharTokenizer().encode("abcd")])
    x = _batch()["input_ids"][:1]
    with torch.no_grad():  # the base model, before a prefix is attached (after, model(ids) refuses)
        full = tiny_gpt(torch.cat([t, x], dim=1)).logits[:, P:]
    prefix.apply(tiny_gpt, prefix.PrefixConfig(P, init="tokens", init_text="abcd"), tokenizer=_CharTokenizer())
    with torch.no_grad():
        with_prefix = tiny_gpt(x, prefix=tiny_gpt.prefix_encoder(1)).logits
    torch.testing.assert_close(with_prefix, full, atol=1e-5, rtol=0)


def test_token_init_through_the_mlp_and_on_bert(tiny_gpt, tiny_classifier):
    tok = _CharTokenizer()
    prefix.apply(tiny_gpt, prefix.PrefixConfig(P, init="tokens", init_text="ab", projection_dim=8), tokenizer=tok)
    ids = torch.tensor(tok.encode("abab"))  # shorter text is repeated to fill P
    want = prefix.token_kv_table(tiny_gpt, ids)
    with torch.no_grad():
        torch.testing.assert_close(tiny_gpt.prefix_encoder.table(), want, atol=1e-4, rtol=0)
    prefix.apply(tiny_classifier, prefix.PrefixConfig(P, init="tokens", init_text="abcd"), tokenizer=tok)
    layer0 = tiny_classifier.bert.layers[0].attn  # BERT's layer-0 keys read the embeddings output
    with torch.no_grad():
        h = tiny_classifier.bert.embeddings(torch.tensor([tok.encode("abcd")]))
        k0 = layer0.k_proj(h)[0]  # (P, C)
    torch.testing.assert_close(tiny_classifier.prefix_encoder.embedding[:, :32], k0, atol=1e-6, rtol=0)


def test_prompt_inits(tiny_gpt):
    tok = _CharTokenizer()
    prompt.apply(tiny_gpt, prompt.PromptConfig(5, init="text", init_text="xy"), tokenizer=tok)
    want = tiny_gpt.wte(torch.tensor(tok.encode("xyxyx")))
    assert torch.equal(tiny_gpt.soft_prompt.embedding, want)
    torch.manual_seed(0)
    g = GPT(GPTConfig(**TINY_GPT))
    prompt.apply(g, prompt.PromptConfig(5, init="vocab"))
    rows = g.soft_prompt.embedding
    assert all((g.wte.weight == r).all(dim=1).any() for r in rows)  # each row is a real token's


# ---------------------------------------------------------------------------- training

def _train(model, batch, steps=12, lr=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model_forward(model, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["prefix", "prefix_mlp", "prompt"])
def test_training_lowers_the_loss(kind, tiny_gpt, tiny_classifier):
    for model, batch in ((tiny_gpt, _batch()), (tiny_classifier, _batch(vocab=99, bert=True))):
        # The base stays frozen, and at the std-0.02 init it computes an almost constant
        # function that no prefix can bend; weights with std 0.2 stand in for a trained model.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
        if kind == "prompt":
            prompt.apply(model, prompt.PromptConfig(P))
        else:
            prefix.apply(model, prefix.PrefixConfig(P, projection_dim=16 if kind == "prefix_mlp" else None))
        frozen = {k: v.clone() for k, v in model.state_dict().items()
                  if not k.startswith(("prefix_encoder.", "soft_prompt."))}
        losses = _train(model, batch)
        assert losses[-1] < 0.8 * losses[0], losses
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # base untouched


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_virtual_tokens(bad):
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1"):
        prefix.PrefixConfig(bad)
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1"):
        prompt.PromptConfig(bad)


def test_bad_configs():
    with pytest.raises(ValueError, match="init must be one of random, tokens"):
        prefix.PrefixConfig(init="vocab")
    with pytest.raises(ValueError, match="projection_dim"):
        prefix.PrefixConfig(projection_dim=0)
    with pytest.raises(ValueError, match="init_text is only used with init='tokens'"):
        prefix.PrefixConfig(init_text="hello")
    with pytest.raises(ValueError, match="needs a non-empty init_text"):
        prompt.PromptConfig(init="text")
    with pytest.raises(ValueError, match="init_text is only used with init='text'"):
        prompt.PromptConfig(init_text="hi")


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_sequence_beyond_positions(kind, tiny_gpt):
    (prefix.apply(tiny_gpt, prefix.PrefixConfig(10)) if kind == "prefix"
     else prompt.apply(tiny_gpt, prompt.PromptConfig(10)))
    ids = torch.zeros(1, 55, dtype=torch.long)  # 10 + 55 > 64 positions
    with pytest.raises(ValueError, match=r"\(10\) \+ sequence \(55\) = 65 exceeds the model's 64 positions"):
        model_forward(tiny_gpt, {"input_ids": ids, "labels": ids})
    model_forward(tiny_gpt, {"input_ids": ids[:, :54], "labels": ids[:, :54]})  # 64 fits
    big = GPT(GPTConfig(**TINY_GPT))
    with pytest.raises(ValueError, match="leaves no room for text"):
        prefix.apply(big, prefix.PrefixConfig(64))


def test_text_init_errors(tiny_gpt):
    tok = _CharTokenizer()
    with pytest.raises(ValueError, match="init_text is 6 tokens, longer than num_virtual_tokens=4"):
        prefix.apply(tiny_gpt, prefix.PrefixConfig(4, init="tokens", init_text="abcdef"), tokenizer=tok)
    with pytest.raises(ValueError, match="init_text is 6 tokens, longer than num_virtual_tokens=4"):
        prompt.apply(tiny_gpt, prompt.PromptConfig(4, init="text", init_text="abcdef"), tokenizer=tok)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        prompt.apply(tiny_gpt, prompt.PromptConfig(4, init="text", init_text="ab"))
    assert getattr(tiny_gpt, "prefix_encoder", None) is None and getattr(tiny_gpt, "soft_prompt", None) is None
    assert all(p.requires_grad for p in tiny_gpt.parameters())  # a failed apply changes nothing


def test_applying_twice_is_an_error(tiny_gpt):
    prefix.apply(tiny_gpt, prefix.PrefixConfig(P))
    with pytest.raises(ValueError, match="already has a prefix_encoder"):
        prefix.apply(tiny_gpt, prefix.PrefixConfig(P))
    with pytest.raises(ValueError, match="prefix and prompt tuning are not combined"):
        prompt.apply(tiny_gpt, prompt.PromptConfig(P))


# ---------------------------------------------------------------------------- eval perplexity

@torch.no_grad()
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_eval_perplexity_weights_each_batch_by_its_real_targets(kind, tiny_gpt):
    """`minift eval`'s perplexity is exp(total loss / total targets) over every batch. With a
    soft prompt the first real token becomes a target (predicted by the last virtual token) and
    the virtual positions never are: each batch's mean loss must be weighted by the targets
    the model scored, not by those of the batch before the prompt was prepended."""
    from minift.training.evaluate import evaluate
    (prompt.apply if kind == "prompt" else prefix.apply)(
        tiny_gpt, (prompt.PromptConfig if kind == "prompt" else prefix.PrefixConfig)(num_virtual_tokens=P))
    with torch.no_grad():
        for p in tiny_gpt.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)  # a prompt that changes the outputs a lot
    a = _batch(B=2, T=8, seed=1)  # 2 rows, the second right-padded
    b = _batch(B=3, T=5, seed=2)
    b["labels"][:, :2] = -100  # prompt-completion style: no loss on each row's first two tokens
    total, n = 0.0, 0
    for batch in (a, b):  # by hand: every scored token's -log p, from the logits
        ids, labels = batch["input_ids"], batch["labels"]
        if kind == "prompt":
            x = tiny_gpt.soft_prompt.embed(ids)  # (B, P+T, C)
            mask = torch.cat([torch.ones(ids.shape[0], P, dtype=torch.long), batch["attention_mask"]], 1)
            logits = tiny_gpt(inputs_embeds=x, attention_mask=mask).logits[:, P - 1:-1]  # predicts tokens 0..T-1
            scored = labels
        else:
            logits = tiny_gpt(ids, attention_mask=batch["attention_mask"],
                              prefix=tiny_gpt.prefix_encoder(ids.shape[0])).logits[:, :-1]  # tokens 1..T-1
            scored = labels[:, 1:]
        logp = torch.log_softmax(logits.float(), -1)
        keep = scored != -100
        total -= logp.gather(-1, scored.clamp(min=0)[..., None])[..., 0][keep].sum().item()
        n += int(keep.sum())
    counts = [int((bt["labels"] != -100).sum()) for bt in (a, b)]
    assert counts[0] != counts[1]  # the batches' weights differ, so a wrong weight shows
    got = evaluate(tiny_gpt, [a, b], "causal-lm")
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_attached_adapter_is_never_silently_ignored(tiny_gpt, tiny_classifier, method):
    """A model with a prefix encoder / soft prompt, called directly without what it supplies,
    refuses and names model_forward, instead of returning the base model's logits."""
    mod = prefix if method == "prefix" else prompt
    cfg = prefix.PrefixConfig(P) if method == "prefix" else prompt.PromptConfig(P)
    for model in (tiny_gpt, tiny_classifier):
        mod.apply(model, cfg)
        b = _batch(bert=model is tiny_classifier)
        with pytest.raises(ValueError, match="model_forward"):
            model(b["input_ids"])
        model_forward(model, {k: v for k, v in b.items() if k != "labels"})  # the hook applied: runs
