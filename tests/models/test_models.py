"""Foundation: minift GPT-2 / BERT against transformers, KV cache, prefix semantics, bad input."""
import json

import pytest
import torch

from conftest import TINY_BERT, TINY_GPT, hf_bert, hf_gpt2
from minift.models.bert import Bert, BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig


def _ids(B=2, T=10, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def _mask(B=2, T=10):
    m = torch.ones(B, T, dtype=torch.long)
    m[1, 6:] = 0  # right padding on the second row
    return m


@torch.no_grad()
def test_gpt2_parity_logits_and_hidden_states(tmp_path):
    hf, d = hf_gpt2(tmp_path)
    m = GPT.from_pretrained(d).eval()
    x = _ids()
    ref = hf(x, output_hidden_states=True)
    out = m(x, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_gpt2_parity_with_padding_mask(tmp_path):
    hf, d = hf_gpt2(tmp_path)
    m = GPT.from_pretrained(d).eval()
    x, mask = _ids(), _mask()
    ref = hf(x, attention_mask=mask).logits
    out = m(x, attention_mask=mask).logits
    keep = mask.bool()  # padded positions are ignored by definition
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=0)


def test_gpt2_loss_matches_hf(tmp_path):
    hf, d = hf_gpt2(tmp_path)
    m = GPT.from_pretrained(d).eval()
    x = _ids()
    labels = x.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        ref = hf(x, labels=labels).loss
        out = m(x, labels)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=0)
    assert out.logits is None  # training needs only the loss
    # the loss is the cross-entropy of the logits the model returns, -100 ignored
    m2 = GPT(GPTConfig(**TINY_GPT))
    y = m2(x, labels, compute_logits=True)
    plain = torch.nn.functional.cross_entropy(y.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1))  # (B*(T-1), V)
    torch.testing.assert_close(y.loss, plain, atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("classifier", [False, True])
def test_bert_parity(tmp_path, classifier):
    hf, d = hf_bert(tmp_path, classifier=classifier)
    x, mask = _ids(vocab=99), _mask()
    tt = torch.zeros_like(x)
    tt[:, 5:] = 1
    if classifier:
        m = BertClassifier.from_pretrained(d).eval()
        torch.testing.assert_close(m(x, mask, tt).logits, hf(x, attention_mask=mask, token_type_ids=tt).logits,
                                   atol=1e-5, rtol=0)
        return
    m = Bert.from_pretrained(d).eval()
    ref = hf(x, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    out = m(x, mask, tt, output_hidden_states=True)
    keep = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[keep], ref.last_hidden_state[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-5, rtol=0)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=0)


@torch.no_grad()
def test_save_pretrained_loads_into_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    g = GPT(GPTConfig(**TINY_GPT)).eval()
    g.save_pretrained(tmp_path / "gpt")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt").eval()
    x = _ids()
    torch.testing.assert_close(hf(x).logits, g(x).logits, atol=1e-5, rtol=0)
    again = GPT.from_pretrained(tmp_path / "gpt")
    for (k, a), b in zip(g.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k

    c = BertClassifier(BertConfig(vocab_size=99, max_position_embeddings=64, n_layer=2, n_head=4, n_embd=32,
                                  n_inner=64, dropout=0.0), num_labels=3).eval()
    c.save_pretrained(tmp_path / "bert")
    hfb = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert").eval()
    x, mask = _ids(vocab=99), _mask()
    torch.testing.assert_close(hfb(x, attention_mask=mask).logits, c(x, mask).logits, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, 5)])
def test_generate_kv_cache_equals_recompute(tiny_gpt, temperature, top_k):
    x = _ids(B=2, T=5)
    torch.manual_seed(7)
    a = tiny_gpt.generate(x, 12, temperature, top_k, use_cache=True)
    torch.manual_seed(7)
    b = tiny_gpt.generate(x, 12, temperature, top_k, use_cache=False)
    assert a.shape == (2, 17)
    assert torch.equal(a, b)


@torch.no_grad()
def test_prefix_of_own_kv_reproduces_full_sequence(tiny_gpt):
    """A prefix holding the first P positions' own keys/values is exactly the KV cache."""
    x = _ids(B=2, T=12)
    P = 5
    full = tiny_gpt(x, return_kv=True)
    prefix = [(k[:, :, :P], v[:, :, :P]) for k, v in full.kv]
    rest = tiny_gpt(x[:, P:], prefix=prefix).logits
    torch.testing.assert_close(rest, full.logits[:, P:], atol=1e-5, rtol=0)
    # BERT: a prefix is seen by every token, and real positions start at P
    torch.manual_seed(0)
    bert = Bert(BertConfig(vocab_size=99, max_position_embeddings=64, n_layer=2, n_head=4, n_embd=32,
                           n_inner=64, dropout=0.0)).eval()
    pk = [(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)) for _ in range(2)]
    y = bert(x, prefix=pk).last_hidden_state
    assert y.shape == (2, 12, 32) and torch.isfinite(y).all()
    assert not torch.allclose(y, bert(x).last_hidden_state)


def test_frozen_bottom_layers_build_no_graph(tiny_gpt):
    for p in tiny_gpt.parameters():
        p.requires_grad_(False)
    for p in tiny_gpt.layers[1].parameters():
        p.requires_grad_(True)
    tiny_gpt.grad_from_layer = 1
    out = tiny_gpt(_ids(), output_hidden_states=True)
    assert out.hidden_states[1].grad_fn is None  # layer 0 ran without autograd
    assert out.hidden_states[2].grad_fn is not None


# ---------------------------------------------------------------------------- bad input

def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Bert.from_pretrained(tmp_path / "nope")


def test_wrong_architecture(tmp_path):
    _, d = hf_bert(tmp_path)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        GPT.from_pretrained(d)


def test_missing_and_misshapen_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    _, d = hf_gpt2(tmp_path)
    sd = load_file(d / "model.safetensors")
    name = next(k for k in sd if k.endswith("h.1.mlp.c_fc.weight"))
    save_file({k: v for k, v in sd.items() if k != name}, d / "model.safetensors")
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj.weight"):
        GPT.from_pretrained(d)
    sd[name] = sd[name][:, :8].contiguous()
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
        GPT.from_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation_function=\"relu\""):
        GPT.from_pretrained(d)


# ---------------------------------------------------------------------------- config fields minift lacks

def _edit_config(d, drop=(), **fields):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    for k in drop:
        cfg.pop(k, None)
    (d / "config.json").write_text(json.dumps(cfg))


def _refused_in_one_line(load, d, field, value):
    with pytest.raises(ValueError) as e:
        load(d)
    msg = str(e.value)
    assert f"{field}={json.dumps(value)}" in msg and "supported" in msg and "\n" not in msg, msg
    return msg


GPT2_UNSUPPORTED = [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                    ("activation_function", "relu"), ("activation_function", "gelu"),
                    ("add_cross_attention", True), ("tie_word_embeddings", False)]
BERT_UNSUPPORTED = [("position_embedding_type", "relative_key"), ("position_embedding_type", "relative_key_query"),
                    ("hidden_act", "relu"), ("hidden_act", "gelu_new"), ("is_decoder", True),
                    ("add_cross_attention", True)]


@pytest.mark.parametrize("field,value", GPT2_UNSUPPORTED)
def test_gpt2_config_asking_for_what_minift_lacks_is_refused(tmp_path, field, value):
    _, d = hf_gpt2(tmp_path)
    _edit_config(d, **{field: value})
    msg = _refused_in_one_line(GPT.from_pretrained, d, field, value)
    assert str(d) in msg
    from minift.models.gpt import config_from_hf  # the reader itself (the advisor uses it too)
    with pytest.raises(ValueError, match=field):
        config_from_hf(json.loads((d / "config.json").read_text()))


@pytest.mark.parametrize("classifier", [False, True])
@pytest.mark.parametrize("field,value", BERT_UNSUPPORTED)
def test_bert_config_asking_for_what_minift_lacks_is_refused(tmp_path, field, value, classifier):
    _, d = hf_bert(tmp_path, classifier=classifier)
    _edit_config(d, **{field: value})
    _refused_in_one_line(BertClassifier.from_pretrained if classifier else Bert.from_pretrained, d, field, value)


@torch.no_grad()
@pytest.mark.parametrize("field,value", [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                                         ("activation_function", "relu"), ("tie_word_embeddings", False)])
def test_gpt2_refused_fields_really_change_what_hf_computes(tmp_path, field, value):
    """The refusal is not pedantry: a real transformers checkpoint with the field set computes
    something else than minift does when the field is ignored (what the loader used to do)."""
    hf, d = hf_gpt2(tmp_path, initializer_range=0.2, **{field: value})  # weights big enough to matter
    assert json.loads((d / "config.json").read_text())[field] == value
    _refused_in_one_line(GPT.from_pretrained, d, field, value)
    _edit_config(d, drop=[field])
    x = _ids()
    assert (GPT.from_pretrained(d).eval()(x).logits - hf(x).logits).abs().max() > 1e-3  # parity is 1e-5


@torch.no_grad()
@pytest.mark.parametrize("field,value", [("is_decoder", True), ("hidden_act", "relu")])
def test_bert_refused_fields_really_change_what_hf_computes(tmp_path, field, value):
    hf, d = hf_bert(tmp_path, initializer_range=0.2, **{field: value})
    assert json.loads((d / "config.json").read_text())[field] == value
    _refused_in_one_line(Bert.from_pretrained, d, field, value)
    _edit_config(d, drop=[field])
    x = _ids(vocab=99)
    assert (Bert.from_pretrained(d).eval()(x).last_hidden_state - hf(x).last_hidden_state).abs().max() > 1e-3


@torch.no_grad()
def test_config_values_minift_computes_identically_are_accepted(tmp_path):
    """reorder_and_upcast_attn only changes the precision HF's eager attention works in (fp32
    scores, scale folded into the matmul): in fp32 the logits agree. gelu_pytorch_tanh is
    gelu_new; gelu_python is gelu; an explicit position_embedding_type "absolute" is the default."""
    x = _ids()
    for i, extra in enumerate([dict(reorder_and_upcast_attn=True, attn_implementation="eager"),
                               dict(activation_function="gelu_pytorch_tanh")]):
        hf, d = hf_gpt2(tmp_path / f"gpt{i}", **extra)
        torch.testing.assert_close(GPT.from_pretrained(d).eval()(x).logits, hf(x).logits, atol=1e-5, rtol=0)
    hf, d = hf_bert(tmp_path / "bert", hidden_act="gelu_python")
    _edit_config(d, position_embedding_type="absolute", is_decoder=False, add_cross_attention=False)
    x = _ids(vocab=99)
    torch.testing.assert_close(Bert.from_pretrained(d).eval()(x).last_hidden_state, hf(x).last_hidden_state,
                               atol=1e-5, rtol=0)


def test_bad_inputs_to_forward(tiny_gpt):
    with pytest.raises(ValueError, match="exactly one"):
        tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def test_more_bad_inputs(tiny_gpt):
    x = _ids(B=1, T=4)
    with pytest.raises(ValueError, match="prefix has 0 layers"):
        tiny_gpt(x, prefix=[])
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        tiny_gpt.generate(x, 2, top_k=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        tiny_gpt.generate(x, 2, temperature=-1.0)


def test_save_pretrained_refuses_an_adapted_model(tiny_gpt, tmp_path):
    from minift.methods import lora
    lora.apply(tiny_gpt, lora.LoRAConfig(r=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match="adapter .*LoRALinear.*unload"):
        tiny_gpt.save_pretrained(tmp_path / "x")
    lora.unload(tiny_gpt)
    tiny_gpt.save_pretrained(tmp_path / "x")  # merged and unloaded: a plain model again
    assert GPT.from_pretrained(tmp_path / "x").layers[0].attn.q_proj.weight.shape == (32, 32)


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_no_grad_forward_keeps_no_earlier_block_outputs(kind):
    """Under no_grad (probing, evaluation, frozen lower layers) a block's output and keys/values
    must die once the next block has read them, unless hidden states or the KV cache are asked for
    (keeping them cost 32 MiB a layer on GPT-2 medium at 8 x 1024)."""
    import weakref
    deep = {"n_layer": 4}
    model = GPT(GPTConfig(**TINY_GPT | deep)) if kind == "gpt" else Bert(BertConfig(**TINY_BERT | deep))
    model.eval()
    alive, refs = [], []

    def keep_ref(mod, inp, out):
        refs.append([weakref.ref(t) for t in (out if isinstance(out, tuple) else (out,))
                     for t in (t if isinstance(t, tuple) else (t,))])

    def count_alive(mod, inp, out):
        alive.append(sum(r() is not None for rs in refs[:-2] for r in rs))

    for block in model.layers:
        block.register_forward_hook(keep_ref)
    model.layers[-1].register_forward_hook(count_alive)
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        model(ids)
        assert alive[-1] == 0
        refs.clear()
        out = model(ids, output_hidden_states=True)
        assert alive[-1] > 0 and len(out.hidden_states) == len(model.layers) + 1


@pytest.mark.parametrize("P,T", [(3, 7), (7, 7), (9, 4), (5, 1)])
def test_prefix_attention_sees_every_prefix_slot_and_is_causal_on_tokens(P, T):
    """All three paths of layers.prefix_attention (zero-query padding, bottom-right mask, one
    query) equal SDPA with the explicit mask, values and gradients."""
    from minift.models.layers import prefix_attention
    g = torch.Generator().manual_seed(P * 10 + T)
    q = torch.randn(2, 3, T, 4, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, P + T, 4, generator=g, requires_grad=True) for _ in range(2))
    allowed = torch.ones(T, P + T, dtype=torch.bool).tril(diagonal=P)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out = prefix_attention(q, k, v, 0.0)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    w = torch.randn(ref.shape, generator=g)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
