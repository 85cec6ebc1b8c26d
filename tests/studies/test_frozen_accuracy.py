"""benchmarks/frozen_accuracy.py's train_steps, the loop both frozen-accuracy benchmarks share: the schedule it
sets, and the same run on the fp32 and on the bf16 frozen base."""

import pytest
import torch

from conftest import benchmark_script, TINY_GPT
from minift.methods.registry import build_method
from minift.models.gpt import GPT, GPTConfig
from minift.training.config import TrainConfig



def _module():
    return benchmark_script("frozen_accuracy")


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, TINY_GPT["vocab_size"], (2, 16), generator=g) for _ in range(n)]
    return [{"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)} for x in ids]


def _lora_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT))
    build_method(model, "lora", {"r": 4, "targets": ("q_proj", "v_proj")})
    return model


def test_warmup_is_a_fraction_of_the_steps_then_linear_decay(monkeypatch):
    lrs, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    tc = TrainConfig(lr=1e-2, steps=6, warmup=0.5, device="cpu")  # 3 warmup steps
    assert len(_module().train_steps(_lora_gpt(), _batches(), tc, cast=False)) == 6
    assert lrs == pytest.approx([1e-2 * f for f in (1 / 4, 2 / 4, 3 / 4, 1.0, 2 / 3, 1 / 3)])


def test_cast_trains_lora_in_fp32_on_a_bf16_base_and_follows_the_fp32_run():
    mod, tc = _module(), TrainConfig(lr=1e-2, steps=4, device="cpu")
    fp32 = mod.train_steps(_lora_gpt(), _batches(), tc, cast=False)
    model = _lora_gpt()
    bf16 = mod.train_steps(model, _batches(), tc, cast=True)
    dtypes = {p.requires_grad: p.dtype for p in model.parameters()}
    assert dtypes == {False: torch.bfloat16, True: torch.float32}
    assert fp32 != bf16 and max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05
