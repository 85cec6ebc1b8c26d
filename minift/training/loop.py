"""One readable training loop for every method.

    for step in range(start, steps):              # one optimizer step
        unfreezer.step(step)                      # gradual unfreezing (freeze.py), if any
        for micro in range(grad_accum):           # gradient accumulation
            with forward_context(model):          # AdaLoRA's batched factors, if any
                loss = model_forward(model, batch).loss
                loss += penalty(model)            # AdaLoRA's orthogonal penalty, if any
            (loss / grad_accum).backward()
        clip_grad_norm_(max_grad_norm); optimizer.step()
        allocator.step(model, step)               # AdaLoRA: after backward, before zero_grad
        optimizer.zero_grad(); eval / log / checkpoint

In the code, ``_Run.steps`` is that loop: ``accumulate`` runs the micro-batches, ``update`` the
optimizer step, ``after_step`` the evaluation and checkpoint when due; ``train`` sets the run up,
resumes it, and on Ctrl-C or a failure saves where it stands (``_Run.end``). Each step's loss
stays on the device until ``read_back`` fetches the losses of ``log_every`` steps at once: on
a GPU, reading a number back waits for every queued kernel, so one read per step would stall
the host that queues the next step's kernels.

The run's settings are a ``TrainConfig`` (``config.py``); the method-specific hooks are explicit
keyword arguments of ``train``, not subclasses or callbacks. Data order is a pure function of
``(seed, epoch)`` (``feed.py``, which also puts each micro-batch on the device), so the position in
the stream is one integer and a resumed run sees exactly the batches an uninterrupted one would.
Checkpoints hold the trainable weights (the adapter for parameter-efficient methods, everything for
full fine-tuning), the optimizer, the schedule position and every RNG; they are written to
``ckpt.tmp/`` and renamed to ``last/`` so a crash mid-write leaves the previous checkpoint intact.
Nothing is unpickled but the index torch.distributed.checkpoint writes for a checkpoint of several
ranks.

Under torchrun (``distributed.py``) every rank runs this loop, with four calls that are the identity
for one process: ``split`` deals each global micro-batch's rows over the ranks, ``sum_gradients``
and ``sum_losses`` sum over them, ``stop_requested`` stops every rank after the same step on
Ctrl-C. Rank 0 alone writes the log, bar and plot; checkpoints hold every rank's part.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minift.fast import adamw as fast_adamw
from minift.training import distributed, metrics_log, speed
from minift.training.checkpoint import (latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                                        save_weights, seed_everything)
from minift.training.config import TrainConfig, lr_factor
from minift.training.feed import Feed
from minift.training.forward import any_padded, model_forward, pick_device


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)   # one per optimizer step, whole run
    evals: list[dict] = field(default_factory=list)     # {"step": s, **metrics}
    steps: int = 0                                      # optimizer steps done
    tokens_per_s: float = 0.0                           # the run's throughput (every rank's tokens)
    first_step_s: float = 0.0                           # the first step's time on the host (compiling, if any)
    steady_tokens_per_s: float = 0.0                    # after the warm-up steps (speed.WARMUP_STEPS), evaluations
    steady_step_ms: float | None = None                 # and checkpoints left out; the mean step there (None: no step)
    peak_gib: float | None = None                       # CUDA: torch.cuda.max_memory_allocated over the run
    interrupted: bool = False
    stopped_early: bool = False
    best: dict | None = None
    checkpoint: str | None = None


# ---------------------------------------------------------------------------- the loop

def train(model: torch.nn.Module, train_batches: Sequence[dict], cfg: TrainConfig, *,
          eval_fn: Callable[[torch.nn.Module], dict] | None = None,
          allocator=None, penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None,
          unfreezer=None, param_groups: list[dict] | None = None,
          forward_context: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None,
          on_start: Callable[[int], None] | None = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``model`` on ``train_batches`` (a sequence of batch dicts) and return the history.

    Hooks: ``allocator.step(model, step)`` after backward and before zero_grad (AdaLoRA);
    ``penalty(model)`` added to every micro-batch loss (AdaLoRA's orthogonal penalty, already
    weighted); ``with forward_context(model):`` around each micro-batch's forward and penalty
    (AdaLoRA's ``batched_factors``: each shape group's factors stacked once);
    ``unfreezer.step(step)`` before each step (gradual unfreezing; the optimizer then
    holds every parameter, and AdamW skips those without a gradient); ``param_groups`` (dicts
    with ``params`` and optionally ``lr``/``weight_decay``: LoRA+, discriminative lrs);
    ``eval_fn(model) -> metrics`` every ``eval_every`` steps; ``on_start(step)`` once the
    checkpoint to resume (if any) is loaded, before the first step; ``on_step(step, loss)`` after
    each step. ``cfg.device`` None trains the model where it is; a device name moves the model
    there first, and it stays there. A KeyboardInterrupt saves a checkpoint (with ``out_dir``)
    and returns with ``interrupted=True``; any other exception after a step has run saves one
    too, then propagates. An evaluation is all or nothing: one interrupted midway leaves no
    trace (no eval record, best or log line) and the checkpoint marks it pending, so
    ``resume`` runs it again, on the same weights and RNG, before the next step.

    On several ranks (``distributed.py``), every rank calls it with the same batches, settings and
    hooks (they decide when the ranks meet); an interrupt is a Ctrl-C they agree on, at the end of
    a step, and a failure on one rank raises there without a checkpoint.
    """
    run = _Run(model, train_batches, cfg, param_groups, eval_fn=eval_fn, allocator=allocator, penalty=penalty,
               unfreezer=unfreezer, forward_context=forward_context or contextlib.nullcontext, on_step=on_step)
    run.resume()
    if on_start is not None:
        on_start(run.step)
    if run.state.get("stopped_early"):  # the run ended by early stopping: resuming it does nothing
        run.res.steps, run.res.stopped_early, run.res.checkpoint = run.step, True, str(run.ckpt)
        model.eval()
        return run.res
    compiling = speed.compile_context(cfg.activation_budget, cfg.compile)  # (a bad budget fails before any step)
    run.begin()
    error = None
    try:
        with distributed.stop_together(), compiling:  # several ranks: Ctrl-C stops every rank after the same step
            run.steps()
    except KeyboardInterrupt as e:
        run.res.interrupted = True
        if run.updating or not distributed.agreed(e):  # weights may be half-updated, or the ranks not
            raise                                      # at the same point: keep the previous checkpoint
        run.opt.zero_grad(set_to_none=True)  # drop the gradients of the step in flight
    except Exception as e:  # a failure: keep the steps done so far (unless weights are half-updated)
        if run.updating or distributed.world_size() > 1:  # (or other ranks may be elsewhere)
            raise
        run.opt.zero_grad(set_to_none=True)
        error = e
    finally:
        run.bar.close()
        model.eval()
    run.end(error)
    if error is not None:
        raise error
    return run.res


class _Run:
    """One call of ``train``: its setup, its steps, its evaluations and checkpoints."""

    def __init__(self, model, batches: Sequence[dict], cfg: TrainConfig, param_groups, *,
                 eval_fn, allocator, penalty, unfreezer, forward_context, on_step):
        """Put the model on its device and build the optimizer (``resume`` then loads a checkpoint)."""
        if len(batches) == 0:
            raise ValueError("train_batches is empty")
        self.model, self.batches, self.cfg, self.res = model, batches, cfg, TrainResult()
        self.eval_fn, self.allocator, self.penalty = eval_fn, allocator, penalty
        self.unfreezer, self.forward_context, self.on_step = unfreezer, forward_context, on_step
        self.device = next(model.parameters()).device if cfg.device is None else pick_device(cfg.device)
        if cfg.device is not None:
            model.to(self.device)
        self.total = cfg.total_steps(len(batches))
        self.warmup = cfg.warmup_steps(self.total)
        self.opt = make_optimizer(model, cfg, param_groups, all_params=unfreezer is not None, device=self.device)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]  # before a checkpoint's scheduled lrs replace them
        self.optimize = fast_adamw.chosen(self.opt, cfg.fast)  # clipping and the AdamW step
        self.out = Path(cfg.out_dir) if cfg.out_dir else None
        self.main = distributed.is_main()  # rank 0 (or the one process): it writes the log, bar and plot
        self.log_path = (cfg.log_path or (str(self.out / "metrics.jsonl") if self.out else None)) if self.main else None
        self.updating = False  # inside the weight update: an interrupt must not be checkpointed

    def resume(self) -> None:
        """Load ``out_dir/last`` when resuming (and cut the log back to it), else seed every RNG."""
        self.state = {"step": 0, "losses": [], "evals": [], "best": None, "bad_evals": 0}
        self.ckpt = latest_checkpoint(self.out) if (self.cfg.resume and self.out) else None
        if self.ckpt is not None:
            self.state = load_checkpoint(self.ckpt, self.model, self.opt, self.allocator)
            # steps after the checkpoint are about to be redone, and so is a pending evaluation
            metrics_log.truncate(self.log_path, self.state["step"], drop_eval=self.state.get("eval_pending", False))
        else:
            seed_everything(self.cfg.seed + distributed.rank())  # several ranks: each its own dropout masks
            if self.log_path and Path(self.log_path).is_file():
                Path(self.log_path).write_text("")  # a fresh start: no lines of an earlier run
        self.step = self.state["step"]  # optimizer steps done
        self.res.losses, self.res.evals, self.res.best = self.state["losses"], self.state["evals"], self.state["best"]

    def begin(self) -> None:
        """Autocast, the progress bar, the throughput clock and the RNG snapshot; compile; train mode."""
        cfg = self.cfg
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and self.device.type == "cuda")
        self.bar = progress_bar(self.total, self.step, cfg.progress and self.main)
        self.n_tokens, self.t0, self.pending, self.first, self.paused = 0, time.perf_counter(), [], None, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.snap, self.snap_step, self.start_step = rng_state(), self.step, self.step
        self.graphs = cfg.compile and cfg.compile_mode == "reduce-overhead" and self.device.type == "cuda"
        if cfg.compile:  # compiled on the first forward; evaluations run eager (``_evaluate_once``)
            self.model.compile(mode=cfg.compile_mode)
            if self.graphs:
                speed.GRAPHED[0] = True
        self.keep_masks = self.graphs and any_padded(self.batches)  # one input signature a step
        self.feed = Feed(self.batches, cfg, self.device, self.keep_masks)
        self.model.train()

    def steps(self) -> None:
        """The optimizer steps from ``self.step`` to the last one, or to an early stop."""
        res, cfg = self.res, self.cfg
        if self.state.pop("eval_pending", False) and self.eval_fn is not None:
            # Ctrl-C stopped the evaluation of this step: finish the step as it would have been
            res.stopped_early = self.after_step()
        while self.step < self.total and not res.stopped_early:
            self.snap, self.snap_step = rng_state(), self.step  # what a checkpoint of `step` steps done restores
            if self.unfreezer is not None:
                self.unfreezer.step(self.step)
            loss = self.accumulate()
            self.updating = True  # an interrupt from here to `step += 1` must not be checkpointed
            self.update()
            self.step += 1
            self.updating = False
            self.pending.append((self.step, loss, self.opt.param_groups[0]["lr"]))
            if (done := self.step - self.start_step) in (1, speed.WARMUP_STEPS):  # (done: in this call)
                if self.device.type == "cuda":  # the GPU work of the steps so far counts in them
                    torch.cuda.synchronize(self.device)
                if done == 1:
                    res.first_step_s = time.perf_counter() - self.t0
                if done == speed.WARMUP_STEPS:  # the steady window opens
                    self.first, self.paused = (self.n_tokens, time.perf_counter()), 0.0
            self.bar.update(1)
            if self.on_step is not None or self.step % cfg.log_every == 0 or self.step == self.total:
                self.read_back()
            res.stopped_early = self.after_step()
            if distributed.stop_requested():  # several ranks: a Ctrl-C reached one of them
                raise distributed.Stop

    def accumulate(self) -> torch.Tensor:
        """Forward and backward of the step's ``grad_accum`` micro-batches; returns their mean loss,
        a 0-d tensor left on the device (``read_back`` brings it to the host)."""
        cfg, model = self.cfg, self.model
        step_loss = None
        for micro in range(cfg.grad_accum):
            batch, tokens, share = self.feed.at(self.step * cfg.grad_accum + micro, model)
            self.n_tokens += tokens
            if self.graphs:  # a new forward: CUDA-graph outputs of the last one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with self.autocast, self.forward_context(model):
                loss = model_forward(model, batch).loss
                if self.penalty is not None:
                    loss = loss + self.penalty(model)
            whole = share == 1 and cfg.grad_accum == 1  # the loss as it is: no kernels to scale it by 1
            (loss if whole else loss * share / cfg.grad_accum).backward()
            # a new tensor either way: under CUDA graphs the loss itself is overwritten by the next replay
            part = loss.detach().float().clone() if whole else loss.detach().float() * share / cfg.grad_accum
            step_loss = part if step_loss is None else step_loss + part
        return step_loss

    def update(self) -> None:
        """The scheduled lr, gradient clipping, the optimizer step, AdaLoRA's allocator, zero_grad."""
        opt, cfg = self.opt, self.cfg
        for g, base in zip(opt.param_groups, self.base_lrs):
            g["lr"] = base * lr_factor(self.step, self.total, self.warmup, cfg.schedule)
        params = [p for g in opt.param_groups for p in g["params"]]
        distributed.sum_gradients(params)  # several ranks: each now holds the global batch's gradient
        self.optimize(cfg.max_grad_norm)  # clipping (unless None) and the AdamW step: fast.adamw.chosen
        if self.allocator is not None:
            self.allocator.step(self.model, self.step)  # AdaLoRA: reads the gradients, so before zero_grad
        opt.zero_grad(set_to_none=True)

    def read_back(self) -> None:
        """The losses of the steps since the last read, brought to the host in one synchronization,
        into the history, the progress bar and the metrics log (one line per step; the last line
        also has the tokens/s so far, exact because the GPU has caught up)."""
        if not self.pending:
            return
        losses = distributed.sum_losses(torch.stack([loss for _, loss, _ in self.pending])).tolist()
        records = [{"step": step, "loss": loss, "lr": lr} for (step, _, lr), loss in zip(self.pending, losses)]
        records[-1]["tok_s"] = tok_s = self.n_tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.res.losses += losses
        metrics_log.append(self.log_path, *records)
        self.bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{self.pending[-1][2]:.2e}", tok_s=f"{tok_s:.0f}")
        self.pending = []

    def after_step(self) -> bool:
        """Evaluate (when due), checkpoint (when due), call on_step; True means: stop early."""
        cfg, step = self.cfg, self.step
        if self.eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == self.total):
            self.read_back()  # the log's step lines come before the evaluation's (and the GPU has caught up)
            t, stop = time.perf_counter(), self.evaluate()  # (left to right: the clock starts first)
            self.paused += time.perf_counter() - t  # not training: the steady throughput leaves it out
            if stop:
                return True
        if self.out and cfg.save_every and step % cfg.save_every == 0 and step < self.total:
            self.read_back()
            t, state = time.perf_counter(), state_json(self.step, self.res, self.state)
            self.res.checkpoint = str(save_checkpoint(self.out, self.model, self.opt, state, self.allocator))
            self.paused += time.perf_counter() - t
        if self.on_step is not None:
            self.on_step(step, self.res.losses[-1])  # read back every step when there is an on_step
        return False

    def end(self, error: Exception | None) -> None:
        """The run's totals; the last checkpoint (and loss plot) unless a failure came before any step."""
        res, state = self.res, self.state
        try:
            self.read_back()
        except Exception:  # noqa: BLE001  (the GPU failed: keep the steps already read, raise the first error)
            if error is None:
                raise
            self.pending = []
        res.steps = self.step
        res.tokens_per_s = self.n_tokens / max(time.perf_counter() - self.t0, 1e-9)
        if self.first is not None and self.step > self.start_step + speed.WARMUP_STEPS:
            train_s = max(time.perf_counter() - self.first[1] - self.paused, 1e-9)
            res.steady_tokens_per_s = (self.n_tokens - self.first[0]) / train_s
            res.steady_step_ms = 1000 * train_s / (self.step - self.start_step - speed.WARMUP_STEPS)
        if self.device.type == "cuda":
            res.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if self.out and (error is None or self.step > self.start_step or state.get("eval_pending")):
            # Interrupted inside a step (its dropout draws must be redone) or an evaluation (it may sample):
            # the RNG is saved as it was when that step, or that evaluation, began.
            rng = state["eval_rng"] if state.get("eval_pending") else self.snap if self.snap_step == self.step else None
            res.checkpoint = str(save_checkpoint(self.out, self.model, self.opt, state_json(self.step, res, state),
                                                 self.allocator, rng=rng))
            if self.cfg.plot and self.main:
                metrics_log.plot_losses(res.losses, res.evals, self.out / "loss.png")

    def evaluate(self) -> bool:
        """Run ``eval_fn``; track the best; save ``best/`` weights. True means: stop early.

        All or nothing: a KeyboardInterrupt or failure anywhere in it takes back what it recorded
        (the eval record, the best, the log line) and marks it pending with the RNG it began with,
        for the checkpoint: a resumed run evaluates this step again, exactly once."""
        res, state = self.res, self.state
        n_evals, best, bad_evals, rng = len(res.evals), res.best, state["bad_evals"], rng_state()
        try:
            return self._evaluate_once()
        except BaseException:
            del res.evals[n_evals:]
            res.best, state["bad_evals"] = best, bad_evals
            metrics_log.truncate(self.log_path, self.step, drop_eval=True)
            state["eval_pending"], state["eval_rng"] = True, rng
            raise

    def _evaluate_once(self) -> bool:
        model, cfg, res, state, step = self.model, self.cfg, self.res, self.state, self.step
        model.eval()
        # eager: evaluation batches have other shapes, each of which would compile again
        eager = torch.compiler.set_stance("force_eager") if self.cfg.compile else contextlib.nullcontext()
        with torch.no_grad(), eager:
            metrics = {k: float(v) for k, v in self.eval_fn(model).items()}
        model.train()
        save_best = (lambda: save_weights(model, self.out / "best")) if self.out else None
        return record_eval(res, state, step, metrics, cfg, self.log_path, save_best)


# ---------------------------------------------------------------------------- pieces

def make_optimizer(model, cfg: TrainConfig, param_groups=None, all_params=False, device=None):
    """AdamW over ``param_groups`` or, by default, the trainable parameters: >= 2-D ones get
    weight decay, biases and LayerNorm weights do not. ``all_params`` includes frozen ones too
    (for gradual unfreezing: AdamW skips a parameter until it has a gradient)."""
    if param_groups is None:
        ps = [p for p in model.parameters() if all_params or p.requires_grad]
        if not ps:
            raise ValueError("the model has no trainable parameters (did the method apply?)")
        param_groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                        {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
        param_groups = [g for g in param_groups if g["params"]]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def record_eval(res: TrainResult, state: dict, step: int, metrics: dict, cfg: TrainConfig, log_path,
                save_best: Callable[[], None] | None, who: str = "") -> bool:
    """One evaluation's ``metrics`` into the history and log; the best (``save_best()`` when it
    improves) and patience. True: stop early. ``who`` prefixes a missing metric's error."""
    res.evals.append({"step": step, **metrics})
    metrics_log.append(log_path, {"step": step, "eval": metrics})
    if cfg.metric not in metrics:
        raise KeyError(f"{who}eval_fn returned {sorted(metrics)}, no {cfg.metric!r} to track")
    value, best = metrics[cfg.metric], res.best
    if best is None or (value > best[cfg.metric] if cfg.higher_is_better else value < best[cfg.metric]):
        res.best, state["bad_evals"] = {"step": step, **metrics}, 0
        if save_best is not None:
            save_best()
        return False
    state["bad_evals"] += 1
    return bool(cfg.patience) and state["bad_evals"] >= cfg.patience


def state_json(step: int, res: TrainResult, state: dict) -> dict:
    """A checkpoint's ``state.json``: a run (or a ``train_many`` job) as it stands at ``step``."""
    return {"step": step, "losses": res.losses, "evals": res.evals, "best": res.best,
            "bad_evals": state["bad_evals"], "stopped_early": res.stopped_early,
            "eval_pending": bool(state.get("eval_pending"))}


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)
