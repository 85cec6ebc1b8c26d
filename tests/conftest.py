"""Shared fixtures: tiny randomly initialized models, and the Hugging Face oracles saved to disk."""
import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import settings

from minift.models.bert import Bert, BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig

# One intra-op thread: the tensors here are tiny, and on the shared 2-core machine two threads
# spin against each other (tests/test_train.py: 104 s with 2 threads, 14 s with 1, same load).
torch.set_num_threads(1)

# Property tests draw the same examples on every run (CI must not pass or fail by luck);
# MINIFT_HYPOTHESIS=explore draws new ones each run, to search further.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("MINIFT_HYPOTHESIS", "repeatable"))


@pytest.fixture(autouse=True)
def fresh_compile():
    """Every test compiles from empty torch.compile caches, and a function recompiled more often than
    dynamo allows fails the test instead of silently running eager (code objects such as ``GPT.forward``
    would otherwise collect compiled variants over a whole test session, one per model class, mode and
    dtype, until dynamo stops compiling them)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


def benchmark_script(name: str):
    """``benchmarks/NAME.py`` loaded as a module (the scripts are files beside the package, not in it)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_GPT = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)
TINY_BERT = dict(vocab_size=99, max_position_embeddings=64, n_layer=2, n_head=4, n_embd=32, n_inner=64)


@pytest.fixture
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY_GPT)).eval()


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    return Bert(BertConfig(**TINY_BERT, dropout=0.0)).eval()


@pytest.fixture
def tiny_classifier():
    torch.manual_seed(0)
    return BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3).eval()


def hf_gpt2(tmp_path, seed=0, **config):
    """A tiny random transformers GPT-2 saved to tmp_path; returns (hf_model, dir).
    ``config``: more GPT2Config fields (e.g. scale_attn_by_inverse_layer_idx=True)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def hf_bert(tmp_path, seed=0, classifier=False, num_labels=3, **config):
    """A tiny random transformers BERT (or BertForSequenceClassification) saved to tmp_path.
    ``config``: more BertConfig fields (e.g. is_decoder=True)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  num_labels=num_labels, **config)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


LLAMA_HF = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
LLAMA_CASES = {  # the transformers config fields of each variant, on top of LLAMA_HF
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "rope-linear": dict(num_key_value_heads=2, rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope-llama3-tied-head_dim": dict(num_key_value_heads=2, tie_word_embeddings=True, head_dim=16,
                                      rope_scaling=LLAMA3_SCALING),
    "biases": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
}


def hf_llama(tmp_path, case="gqa", seed=0, qwen2=False, **config):
    """A tiny random transformers LlamaForCausalLM (Qwen2ForCausalLM) saved to tmp_path; (model, dir).
    initializer_range 0.2: weights big enough that a wrong detail shows in the logits; every
    parameter moved off its init, so biases (init 0) and norm weights (init 1) are tested too."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    fields = LLAMA_HF | LLAMA_CASES[case] | dict(initializer_range=0.2) | config
    if qwen2:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path)
    return model, tmp_path


# ---------------------------------------------------------------------------- CLI fixtures

WORDS = "good great fun bad awful dull movie plot film the a was is very not and".split()

def tokenizer_json(path: Path, specials: list[str], bert: bool) -> int:
    """A word-level tokenizer.json over WORDS (BERT: with [CLS] ... [SEP]); returns its vocabulary size."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if bert else specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.save(str(path / "tokenizer.json"))
    return len(vocab)


# ---------------------------------------------------------------------------- damage: each leaves a broken file at p

def garbage(p: Path) -> None:
    p.write_bytes(random.Random(p.name).randbytes(max(p.stat().st_size, 64)))


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def empty(p: Path) -> None:
    p.write_bytes(b"")


def text_file(p: Path) -> None:
    p.write_text("my notes: this is not a weights file\n" * 4)


def not_json(p: Path) -> None:
    p.write_text('{"step": 2, "losses": [0.5, ')


def json_list(p: Path) -> None:
    p.write_text("[1, 2, 3]\n")


def not_utf8(p: Path) -> None:
    p.write_bytes(b"\xff\xfe" + p.read_bytes())


# ---------------------------------------------------------------------------- a toy network for LoRA

class Toy(nn.Module):
    def __init__(self, d_in, d_hid, d_out, bias):
        super().__init__()
        self.up = nn.Linear(d_in, d_hid, bias=bias)
        self.down = nn.Linear(d_hid, d_out, bias=bias)
        self.head = nn.Linear(d_out, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


def tiny_lm_dir(d: Path) -> Path:
    """``d/gpt``: a tiny GPT-2 (2 layers, 16 wide, 32 positions) with a word-level tokenizer, and
    ``d/lm.txt``, a causal-LM text over WORDS; returns ``d``."""
    (d / "gpt").mkdir()
    n = tokenizer_json(d / "gpt", ["<|endoftext|>"], bert=False)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=n, block_size=32, n_layer=2, n_head=2, n_embd=16)).save_pretrained(d / "gpt")
    (d / "lm.txt").write_text(" ".join(WORDS * 6))
    return d


def llama_dir(tmp_path):
    """A tiny random minift Llama saved with a word-level tokenizer in ``tmp_path/llama``, and a
    causal-LM text file ``tmp_path/lm.txt``: what ``minift train`` needs; returns (dir, text file)."""
    from minift.models.llama import Llama, LlamaConfig
    d = tmp_path / "llama"
    d.mkdir()
    n = tokenizer_json(d, ["<|endoftext|>"], bert=False)
    torch.manual_seed(0)
    Llama(LlamaConfig(vocab_size=n, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=64,
                      max_position_embeddings=64)).save_pretrained(d)
    (tmp_path / "lm.txt").write_text(" ".join(WORDS * 6))
    return d, tmp_path / "lm.txt"


# ---------------------------------------------------------------------------- merged LoRA models

TINY_LLAMA = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=64)


def merged_lora_model(kind: str, targets, *, dropout: float = 0.0, seed: int = 0):
    """A tiny GPT, BertClassifier (3 labels) or Llama (``kind``), model dropout off, LoRA r=3 on
    ``targets`` with B random (the adapters change the output, and A's gradient is not zero), its LoRA
    layers on the merged forward (``fast.lora``), in training mode."""
    from minift.fast import lora as fast_lora
    from minift.methods import lora
    from minift.models.llama import Llama, LlamaConfig
    torch.manual_seed(seed)
    if kind == "gpt":
        model = GPT(GPTConfig(**TINY_GPT, dropout=0.0))
    elif kind == "bert":
        model = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3)
    else:
        model = Llama(LlamaConfig(**TINY_LLAMA))
    lora.apply(model, lora.LoRAConfig(r=3, targets=targets, dropout=dropout))
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B.normal_(0, 0.1)
    fast_lora.enable(model.train())
    return model


def kind_batch(kind: str, device: str = "cpu") -> dict:
    """Two rows of 9 tokens for ``merged_lora_model(kind)``: next-token labels, or classes for BERT."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    batch = {"input_ids": ids, "labels": torch.tensor([0, 2]) if kind == "bert" else ids}
    return {k: v.to(device) for k, v in batch.items()}


def loss_and_grads(model, batch, autocast: bool = False, device: str = "cpu") -> list[torch.Tensor]:
    """One forward and backward (under bf16 autocast on ``device`` if asked): the loss, then every
    trainable parameter's gradient, all in fp32; the gradients are cleared after."""
    from minift.training.forward import model_forward
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = model_forward(model, batch).loss
    if not loss.requires_grad:  # every adapter merged into W0: nothing to train through
        return [loss.detach().float()]
    loss.backward()
    grads = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return [loss.detach().float(), *grads]


def double_backward(model, batch) -> None:
    """The gradients of ``model``'s loss on ``batch`` with create_graph=True (a second-order step)."""
    from minift.training.forward import model_forward
    loss = model_forward(model, batch).loss
    torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], create_graph=True)


def relative_off(got: list[torch.Tensor], want: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's distance from its counterpart in ``want``, relative to the latter's norm."""
    return torch.stack([(g - w).norm() / w.norm().clamp_min(1e-12) for g, w in zip(got, want)])


def saved_bytes(model, batch, loss_extra=None) -> tuple[int, torch.Tensor]:
    """Bytes of the storages autograd still holds for backward once the forward is done
    (parameters excluded; each storage once), and the loss (which keeps the graph alive)."""
    import weakref

    from minift.training.forward import model_forward
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    refs = []

    class Box:  # a weak reference to the box tells whether autograd still holds it
        def __init__(self, t):
            self.t = t

    def pack(t):
        box = Box(t)
        refs.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        loss = model_forward(model, batch).loss
        if loss_extra is not None:
            loss = loss + loss_extra(model)
    held = {}
    for r in refs:
        box = r()
        if box is not None and box.t.untyped_storage().data_ptr() not in params:
            held[box.t.untyped_storage().data_ptr()] = box.t.untyped_storage().nbytes()
    return sum(held.values()), loss


def peft_adalora_pruned(hf, tmp_path, **config):
    """A PEFT AdaLoRA on a copy of ``hf`` (init_r 4 -> target_r 2, the whole schedule in 4 steps),
    its factors and gradients random, pruned by PEFT's own allocator and saved by
    ``save_pretrained`` to ``tmp_path/peft``; returned in eval mode."""
    import copy

    import peft
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, tinit=0, tfinal=1, deltaT=1, total_step=4, **config))
    g = torch.Generator().manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            p.grad = torch.randn(p.shape, generator=g)
    for t in range(4):
        pm.base_model.update_and_allocate(t)
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    return pm
