"""Would stacking LoRA's rank-r products into the base GEMMs pay? Times the GEMMs of one
merged-forward LoRA layer (``lora.MergedLoRA``) both ways, on the GPU, under CUDA graphs (so
launch overhead is not in the numbers).

Per adapted layer and step, besides the base layer's two GEMMs (y = x W^T forward, dx = g W
backward), MergedLoRA runs four thin products: A x (forward), g B, (g B)^T x and g^T (A x)
(backward), each a pass over an (N, in) or (N, out) activation, plus two rebuilds of W = W0 + sBA.
"Stacked" folds two of the thin ones into the base GEMMs: x [W; A]^T gives y and A x in one GEMM
(out + r output columns), g [W | B] gives dx and g B (in + r columns). The extra r columns cost a
partial tile in each of those GEMMs; this script says whether that beats the separate thin GEMMs.
It also times the rebuild both ways: ``torch.addmm`` and ``minift.fast.kernels`` (one Triton pass).

    python benchmarks/lora_gemm_shapes.py --out benchmarks/results        # on a CUDA machine, ~30 s
    python benchmarks/lora_gemm_shapes.py --device cpu --tokens 256       # smoke test (plain timing)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minift.fast import kernels  # noqa: E402

# GPT-2 medium's projections: q, k, v, o (1024 -> 1024), up (1024 -> 4096), down (4096 -> 1024)
SHAPES = {"attn": (1024, 1024), "up": (1024, 4096), "down": (4096, 1024)}


def gpu_time(fn, reps: int = 20) -> float:
    """Microseconds per call of ``fn``: ``reps`` calls captured in one CUDA graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (5 * reps)


def cpu_time(fn, reps: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1e6 / reps


def layer_ops(N: int, d_in: int, d_out: int, r: int, device: str, dtype) -> dict:
    """name -> zero-argument function, for one adapted layer; the stacked results are checked
    against the separate ones before anything is timed."""
    g_ = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g_) / s[-1] ** 0.5  # noqa: E731
    x, g = rand(N, d_in), rand(N, d_out)
    W0, A, B = rand(d_out, d_in), rand(r, d_in), rand(d_out, r)
    W = torch.addmm(W0, B, A, alpha=2.0)
    WA, WB = torch.cat([W, A]), torch.cat([W, B], dim=1)  # (out + r, in), (out, in + r)
    ax, gB = x @ A.t(), g @ B
    ya, dxb = x @ WA.t(), g @ WB
    for got, want in ((ya[:, :d_out], x @ W.t()), (ya[:, d_out:], ax), (dxb[:, :d_in], g @ W), (dxb[:, d_in:], gB)):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    return {
        "rebuild W0 + sBA": lambda: torch.addmm(W0, B, A, alpha=2.0),
        "rebuild (minift.fast.kernels)": lambda: kernels.lora_merged_weight(W0, A, B, 2.0),
        "y = x W^T": lambda: x @ W.t(),
        "A x": lambda: x @ A.t(),
        "[y | A x] = x [W; A]^T": lambda: x @ WA.t(),
        "dx = g W": lambda: g @ W,
        "g B": lambda: g @ B,
        "[dx | g B] = g [W | B]": lambda: g @ WB,
        "dA = (g B)^T x": lambda: gB.t() @ x,
        "dB = g^T (A x)": lambda: g.t() @ ax,
    }


def layout_ops(N: int, d_in: int, d_out: int, r: int, device: str, dtype) -> dict:
    """The backward's three thin products, each written the way ``MergedLoRA`` writes it and the
    other way round (the transposed problem, whose result is transposed back: a free view), and dA,
    dB with fp32 outputs (``torch.mm(..., out_dtype=)``, CUDA only). cuBLAS picks its kernel by
    shape and layout; for an (N, 8) result it may pick a tile as wide as 64 columns. Results are
    checked against the written-out ones before anything is timed."""
    g_ = torch.Generator(device=device).manual_seed(1)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g_) / s[-1] ** 0.5  # noqa: E731
    x, g, A, B = rand(N, d_in), rand(N, d_out), rand(r, d_in), rand(d_out, r)
    ax, gB = x @ A.t(), g @ B
    ops = {
        "g B": lambda: g @ B,
        "g B as (B^T g^T)^T": lambda: (B.t() @ g.t()).t(),
        "A x as (A x^T)^T": lambda: (A @ x.t()).t(),
        "dA = (g B)^T x": lambda: gB.t() @ x,
        "dA as (x^T (g B))^T": lambda: (x.t() @ gB).t(),
        "dB = g^T (A x)": lambda: g.t() @ ax,
        "dB as ((A x)^T g)^T": lambda: (ax.t() @ g).t(),
    }
    if device.startswith("cuda") and dtype != torch.float32:
        f32 = torch.float32
        ops["dA, fp32 out"] = lambda: torch.mm(gB.t(), x, out_dtype=f32)
        ops["dA as (x^T (g B))^T, fp32 out"] = lambda: torch.mm(x.t(), gB, out_dtype=f32).t()
        ops["dB, fp32 out"] = lambda: torch.mm(g.t(), ax, out_dtype=f32)
        ops["dB as ((A x)^T g)^T, fp32 out"] = lambda: torch.mm(ax.t(), g, out_dtype=f32).t()
    want = {"g B": gB, "A x": ax, "dA": gB.t() @ x, "dB": g.t() @ ax}
    for name, f in ops.items():
        key = name.split(" ")[0].rstrip(",") if name[0] == "d" else name[:3]  # "dA as ..." -> "dA", "g B as" -> "g B"
        torch.testing.assert_close(f().to(dtype), want[key], atol=2e-2, rtol=2e-2)
    return ops


def stacked_qkv_ops(N: int, d: int, r: int, device: str, dtype) -> dict:
    """q, k and v read one input x: their A's stacked (3r, d) give the three A x in one GEMM, and
    their (g B)'s side by side (N, 3r) give the three dA in one; against three of each."""
    g_ = torch.Generator(device=device).manual_seed(2)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g_) / s[-1] ** 0.5  # noqa: E731
    x, A3, gB3 = rand(N, d), rand(3 * r, d), rand(N, 3 * r)
    As, gBs = A3.split(r), [t.contiguous() for t in gB3.split(r, dim=1)]
    return {
        "3 x A x": lambda: [x @ a.t() for a in As],
        "A x, A's stacked": lambda: x @ A3.t(),
        "3 x dA": lambda: [gb.t() @ x for gb in gBs],
        "dA, stacked": lambda: gB3.t() @ x,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="N = batch x sequence (8 x 1024)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sweep", action="store_true", help="also time minift.fast.kernels' rebuild for several tiles")
    p.add_argument("--layouts", action="store_true",
                   help="also time the backward's thin products in both layouts, and q,k,v's A's stacked")
    p.add_argument("--out", default=None, help="directory for lora-gemm-shapes.json (default: print only)")
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = gpu_time if cuda else cpu_time
    rows = {}
    for name, (d_in, d_out) in SHAPES.items():
        us = {k: round(timer(f), 2) for k, f in layer_ops(a.tokens, d_in, d_out, a.r, a.device, dtype).items()}
        separate = us["y = x W^T"] + us["A x"] + us["dx = g W"] + us["g B"]
        stacked = us["[y | A x] = x [W; A]^T"] + us["[dx | g B] = g [W | B]"]
        rows[name] = {"in": d_in, "out": d_out, "us": us, "separate_us": round(separate, 2),
                      "stacked_us": round(stacked, 2)}
        print(f"{name} ({d_in} -> {d_out}): " + ", ".join(f"{k} {v}" for k, v in us.items()), flush=True)
        print(f"  base GEMMs + A x + g B: separate {separate:.1f} us, stacked {stacked:.1f} us", flush=True)
    if a.sweep and cuda:
        tiles = [(32, 128, 4), (64, 128, 4), (64, 256, 8), (16, 256, 4), (128, 128, 8), (32, 256, 4), (8, 512, 4),
                 (64, 64, 4), (128, 64, 4), (32, 512, 8)]
        for name, (d_in, d_out) in SHAPES.items():
            W0, A, B = (torch.randn(*s, device=a.device, dtype=dtype) for s in ((d_out, d_in), (a.r, d_in), (d_out, a.r)))
            ref = kernels.lora_merged_weight(W0, A, B, 2.0, tile=tiles[0])
            sweep = {}
            for tile in tiles:
                torch.testing.assert_close(kernels.lora_merged_weight(W0, A, B, 2.0, tile=tile), ref, rtol=0, atol=0)
                sweep["x".join(map(str, tile))] = round(timer(lambda: kernels.lora_merged_weight(W0, A, B, 2.0, tile=tile)), 2)
            rows[name]["rebuild_tiles_us"] = sweep
            print(f"{name} rebuild by tile (rows x cols x warps): {sweep}", flush=True)
    if a.layouts:
        for name, (d_in, d_out) in SHAPES.items():
            us = {k: round(timer(f), 2) for k, f in layout_ops(a.tokens, d_in, d_out, a.r, a.device, dtype).items()}
            rows[name]["layouts_us"] = us
            print(f"{name} layouts: {us}", flush=True)
        us = {k: round(timer(f), 2) for k, f in stacked_qkv_ops(a.tokens, 1024, a.r, a.device, dtype).items()}
        rows["attn"]["qkv_stacked_us"] = us
        print(f"q, k, v stacked: {us}", flush=True)
    per_layer = {k: sum((4 if n == "attn" else 1) * rows[n][k] for n in rows) for k in ("separate_us", "stacked_us")}
    print(f"one GPT-2 medium layer (6 projections): separate {per_layer['separate_us']:.1f} us, "
          f"stacked {per_layer['stacked_us']:.1f} us")
    if a.out:
        meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                "tokens": a.tokens, "r": a.r, "dtype": str(dtype).replace("torch.", ""),
                "timing": "CUDA graph replay" if cuda else "wall clock"}
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "lora-gemm-shapes.json"), "w") as fh:
            json.dump({"meta": meta, "shapes": rows, "per_layer": per_layer}, fh, indent=1)


if __name__ == "__main__":
    main()
