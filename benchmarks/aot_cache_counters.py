"""`minift bench` in this process, then AOTAutograd's cache counters: whether the compiled step's
joint graph was traced anew (``autograd_cache_miss``, then ``_saved``), loaded (``autograd_cache_hit``)
or not cacheable (``autograd_cache_bypass``).

    python3 benchmarks/aot_cache_counters.py [minift bench arguments, one method; --no-isolate is added]

One method: the counters are this process's, and under CUDA graphs torch 2.11 compiles one graphed
model per process (a second method would run without graphs).

Run it twice with one ``TORCHINDUCTOR_CACHE_DIR`` (``benchmarks/gpu.sh compile-cache``): the second
run's row has the first step's seconds from the caches.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch._dynamo.utils as dynamo_utils  # noqa: E402

from minift.cli import main  # noqa: E402

if __name__ == "__main__":
    code = main(["bench", *sys.argv[1:], "--no-isolate"])  # one process: the counters are this one's
    print("aot_autograd counters", json.dumps(dict(dynamo_utils.counters["aot_autograd"])))
    raise SystemExit(code)
