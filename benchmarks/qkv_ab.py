"""A/B of q, k and v's LoRA factors stacked (``minift.fast.qkv``), which ``minift.fast.enable`` switches on
wherever LoRA takes the merged forward.

Runs ``minift bench`` in this process, with ``fast.qkv`` as it is (``on``) or with its ``enable``
replaced by one that switches nothing (``off``: each q/k/v LoRA layer runs its own merged forward).
Usage: qkv_ab.py {on,off} [minift bench arguments; add --no-isolate: a spawned worker would not see
the swap]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minift.cli import main  # noqa: E402
from minift.fast import qkv  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("on", "off"):
        sys.exit("usage: qkv_ab.py {on,off} [minift bench arguments]")
    if "--no-isolate" not in sys.argv:
        sys.exit("qkv_ab.py needs --no-isolate: a spawned worker process would run the unswapped code")
    if sys.argv[1] == "off":
        qkv.enable = lambda model: []
    raise SystemExit(main(["bench", *sys.argv[2:]]))
