"""K LoRA jobs trained together (training/many.py) follow K separate `train` runs step by step."""
import pytest
import torch

from minift import fast
from minift.methods import lora
from minift.methods.lora import LoRAConfig
from minift.models.gpt import GPT, GPTConfig
from minift.training.loop import train
from minift.training.config import TrainConfig
from minift.training.many import Job, add_jobs, train_many

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)


def base(seed=0, arch="gpt"):
    torch.manual_seed(seed)
    if arch == "llama":  # untied head: the fused loss reads lm_head's matrix, not the embedding's
        from minift.models.llama import Llama, LlamaConfig
        return Llama(LlamaConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=64,
                                 tie_word_embeddings=False))
    return GPT(GPTConfig(**TINY))


def data(n, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 97, (B, T), generator=g)
        mask = torch.ones_like(x)
        mask[0, -2:] = 0
        out.append({"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)})
    return out


def jobs():
    kw = dict(progress=False, plot=False)
    return [Job("a", LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj")), data(3, 2, 12, 1),
                TrainConfig(lr=1e-2, steps=6, warmup=2, schedule="cosine", weight_decay=0.1, seed=1, **kw)),
            Job("b", LoRAConfig(r=4, alpha=3, targets=("up_proj", "down_proj"), rslora=True), data(2, 3, 9, 2),
                TrainConfig(lr=5e-3, steps=4, schedule="linear", seed=2, max_grad_norm=0.05, **kw)),
            Job("c", LoRAConfig(r=1, alpha=8, targets=("q_proj", "o_proj")), data(4, 1, 16, 3),
                TrainConfig(lr=2e-2, steps=5, schedule="constant", seed=3, **kw))]


@pytest.mark.parametrize("fast_on,arch", [(False, "gpt"), (True, "gpt"), (True, "llama")])
def test_jobs_trained_together_equal_each_trained_alone(fast_on, arch):
    """On the reference path, and with minift.fast on (gathered mixed batch, one fused loss pass
    for every job: fast.loss.grouped_lm_loss) against the separate runs' reference path; a Llama
    base's fused loss reads its own head matrix."""
    model, js = base(arch=arch), jobs()
    add_jobs(model, js)
    if fast_on:
        assert "fused loss: 1 modules" in fast.enable(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    together = train_many(model, js)
    for j in js:
        alone = base(arch=arch)
        lora.apply(alone, j.lora)
        with torch.no_grad():
            for name, m in lora.lora_modules(alone):
                m.lora_A.copy_(start[f"{name}.lora_A.{j.name}"])  # the same starting adapter
        want = train(alone, j.batches, j.cfg).losses
        assert len(together.losses[j.name]) == len(want) == j.cfg.steps
        assert together.losses[j.name] == pytest.approx(want, rel=1e-5, abs=1e-6)
        for name, m in lora.lora_modules(alone):  # and the adapters end where the separate runs end
            got = model.get_submodule(name).lora_B[j.name]
            torch.testing.assert_close(got, m.lora_B, rtol=1e-4, atol=1e-5)


def test_job_names_must_differ_and_grad_accum_is_one():
    js = jobs()
    with pytest.raises(ValueError, match="job names must differ"):
        add_jobs(base(), [js[0], js[0]])
    js[1].cfg = TrainConfig(lr=1e-3, steps=2, grad_accum=2, progress=False)
    with pytest.raises(ValueError, match="job b: train_many runs grad_accum 1"):
        add_jobs(base(), js)


def test_jobs_that_mix_tasks_are_refused():
    js = jobs()
    js[2].batches = [{**b, "labels": b["labels"][:, 0]} for b in js[2].batches]
    with pytest.raises(ValueError, match="the jobs mix tasks"):
        add_jobs(base(), js)


def test_lora_dropout_alone_draws_trains_masks_and_beside_others_its_own_rows_masks():
    """A job's LoRA dropout acts on its own rows. Alone, the job draws exactly the masks `train`
    draws (one generator, the same calls in the same order); beside other jobs the masks are drawn
    over the mixed batch, so its losses then differ from its run alone by the masks only."""
    def with_dropout(js):
        js[0].lora = LoRAConfig(r=2, alpha=4, dropout=0.3, targets=("q_proj", "v_proj"))
        return js
    model, (j,) = base(), with_dropout(jobs())[:1]
    add_jobs(model, [j])
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    together = train_many(model, [j])
    alone = base()
    lora.apply(alone, j.lora)
    with torch.no_grad():
        for name, m in lora.lora_modules(alone):
            m.lora_A.copy_(start[f"{name}.lora_A.a"])
    want = train(alone, j.batches, j.cfg).losses
    assert together.losses["a"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    model, js = base(), with_dropout(jobs())
    add_jobs(model, js)
    q = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    assert isinstance(q.dropout["a"], torch.nn.Dropout) and isinstance(q.dropout["c"], torch.nn.Identity)
    mixed = train_many(model, js).losses["a"]
    assert mixed != pytest.approx(want, rel=1e-5) and all(abs(a - b) < 0.5 for a, b in zip(mixed, want))


def test_a_job_that_stops_early_leaves_the_others_as_they_were():
    model, js = base(), jobs()
    add_jobs(model, js)
    full = train_many(model, js)
    model, js = base(), jobs()
    js[0].cfg = TrainConfig(**{**vars(js[0].cfg), "eval_every": 1, "patience": 1})
    js[0].eval_fn = lambda m: {"loss": 1.0}  # never better than the first: stops after its second evaluation
    add_jobs(model, js)
    res = train_many(model, js)
    a = res.jobs["a"]
    assert a.stopped_early and a.steps == 2 and [e["step"] for e in a.evals] == [1, 2]
    assert a.losses == full.losses["a"][:2]
    for name in ("b", "c"):  # each job's rows are its own: the others train exactly as before
        assert res.losses[name] == pytest.approx(full.losses[name], rel=1e-6, abs=1e-7)
        assert res.jobs[name].steps == len(full.losses[name])


def test_an_adapter_on_the_lm_head_is_refused():
    """Each job's loss reads the shared head from the hidden states, so the head takes no adapter."""
    from minift.models.llama import Llama, LlamaConfig
    model = Llama(LlamaConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, n_inner=32,
                              tie_word_embeddings=False))
    js = jobs()
    js[1].lora = LoRAConfig(r=2, targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="job b: train_many does not adapt lm_head"):
        add_jobs(model, js)
