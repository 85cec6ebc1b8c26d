"""The rank-r products of LoRA's training step, timed alone on the GPU (issue 9's LoRA gap).

Besides the base layer's GEMMs, a merged-forward LoRA layer (``lora.MergedLoRA``) runs four thin
products per step, each a pass over an (N, in) or (N, out) activation: A x (forward), g B, (g B)^T x
and g^T (A x) (backward). This times them, compiled, written as matmuls (cuBLAS) against written
as broadcast-multiply-and-sum (a reduction inductor generates itself), and three q/k/v layers'
A x as one product against three, and reports effective bandwidth (bytes of the big operand read).

    python benchmarks/lora_skinny_ops.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def timed(fn, *args, iters=50):
    for _ in range(3):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1000  # microseconds


def mm_forms(x, g, A, B, ax, gB):
    return x @ A.t(), g @ B, gB.t() @ x, g.t() @ ax


def sum_forms(x, g, A, B, ax, gB):
    return ((x[:, None, :] * A[None]).sum(-1), (g[:, None, :] * B.t()[None]).sum(-1),
            (gB[:, :, None] * x[:, None, :]).sum(0), (g[:, :, None] * ax[:, None, :]).sum(0))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    dev, dt, N, r = "cuda", torch.bfloat16, a.tokens, a.r
    rows = []
    for d_in, d_out in ((1024, 1024), (1024, 4096), (4096, 1024)):
        x, g = torch.randn(N, d_in, device=dev, dtype=dt), torch.randn(N, d_out, device=dev, dtype=dt)
        A, B = torch.randn(r, d_in, device=dev, dtype=dt), torch.randn(d_out, r, device=dev, dtype=dt)
        ax, gB = x @ A.t(), g @ B
        for name, fn in (("matmul", mm_forms), ("sum", sum_forms)):
            f = torch.compile(fn)
            want = mm_forms(x, g, A, B, ax, gB)
            got = f(x, g, A, B, ax, gB)
            err = max(((u.float() - v.float()).abs().max() / v.float().abs().max()).item() for u, v in zip(got, want))
            parts = []
            for i, big in enumerate((x, g, x, g)):  # each product alone
                fi = torch.compile(lambda *t, i=i, fn=fn: fn(*t)[i])
                us = timed(fi, x, g, A, B, ax, gB)
                parts.append({"us": round(us, 1), "GBps": round(big.numel() * 2 / us / 1e3, 1)})
            rows.append({"in": d_in, "out": d_out, "form": name, "rel_err": err,
                         "ax": parts[0], "gB": parts[1], "dA": parts[2], "dB": parts[3],
                         "all_four_us": round(timed(f, x, g, A, B, ax, gB), 1)})
            print(rows[-1], flush=True)
    x = torch.randn(N, 1024, device=dev, dtype=dt)
    As = [torch.randn(r, 1024, device=dev, dtype=dt) for _ in range(3)]
    three = torch.compile(lambda x, a, b, c: (x @ a.t(), x @ b.t(), x @ c.t()))
    one = torch.compile(lambda x, a, b, c: x @ torch.cat([a, b, c]).t())
    qkv = {"three_us": round(timed(three, x, *As), 1), "stacked_us": round(timed(one, x, *As), 1)}
    print("q/k/v A x:", qkv)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": N, "r": r, "dtype": "bf16"}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "lora-skinny-ops.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows, "qkv": qkv}, fh, indent=1)


if __name__ == "__main__":
    main()
