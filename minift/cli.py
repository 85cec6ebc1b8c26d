"""The `minift` command.

Each subcommand has a ``_add_<name>(sub)`` that declares its flags and a ``_cmd_<name>(args)``
that runs it. Exit codes: 0 success, 2 bad usage or input (one line on stderr, no traceback),
1 failure at run time.
"""
from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """Bad usage or input: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minift", description="Fine-tuning methods for transformers, from scratch.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in [v for k, v in sorted(globals().items()) if k.startswith("_add_")]:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"minift {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minift {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure at run time: one line, exit 1
        print(f"minift {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------- subcommands
# Add each subcommand as a pair of functions below, in its own section.
