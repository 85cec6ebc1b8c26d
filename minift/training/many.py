"""K LoRA jobs trained together on one frozen base: one forward and backward per step for all.

Each job is what ``minift train`` would run alone: its own adapter (rank, alpha, targets), data,
data order (its seed), learning rate (LoRA+ ratio too), schedule, warmup, weight decay, gradient
clipping, AdamW state, dev evaluations, early stopping and files. A step of ``train_many``:

    rows = [job 1's micro-batch | job 2's | ... | job K's]     (padded to one length, masked)
    with mixed_batch(model, [name of each row's job]):          (methods/multi_lora.py)
        h = model(rows).hidden_states[-1]                       the base runs once for all rows
    loss = sum over jobs k of lm_loss(h[rows of k], labels k)   job k's mean loss, as it alone computes it
    loss.backward()                                             job k's A, B get only its rows' gradient
    for each job: its lr, clip its gradients, its AdamW step; then its evaluation and checkpoint
    (the losses stay on the device until a job's log interval, evaluation or checkpoint reads them)

Because the rows are disjoint and each adapter acts only on its own rows, the gradient that reaches
job k's adapter is exactly the gradient of job k's loss alone: the K trajectories are those of K
separate runs (tests/training/test_many.py checks them against ``train``, step by step). What is
shared is the work on the base: one pass of W0 over all rows instead of K. Dropout is the
exception, the base's and the adapters' (a job's LoRA dropout applies to its own rows, as its layer
alone would): the masks are drawn from one generator over the mixed batch, so each job then sees
other (equally random) masks than it would alone; a single job sees the masks ``train`` draws.
Under dropout the fast mixed forward (``fast/multi_lora.py``) gives way to the reference one, which
draws each adapter's mask over its own rows. A classification job's new head is its own
(``Job.modules``, a ``ModulesToSave`` copy its rows go through), as ``train``'s LoRA trains one.

Each job keeps its own position: a job that has done its steps (or stopped early) adds no rows
to later steps, and the others go on. Its files, under ``cfg.out_dir``, are those ``train``
writes: ``metrics.jsonl``, ``last/`` (a checkpoint in ``train``'s format, over the job's adapter
seen as a plain LoRA model, so its keys are ``lora.apply``'s), ``best/`` and ``loss.png``. Resume
is per job (``cfg.resume``: from its ``last/``), so jobs saved at different steps still continue
exactly. Ctrl-C saves every unfinished job where it stands, as ``train`` does; an interrupt
inside the weight updates saves nothing (the previous checkpoints stay) and propagates.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.adapters.multi import as_single, lora_config_as  # the one-adapter view save_adapters writes through
from minift.fast import adamw as fast_adamw
from minift.fast.loss import FusedLMLoss
from minift.methods import lora
from minift.methods.common import freeze_all
from minift.methods.lora import LoRAConfig
from minift.methods.multi_lora import add_adapter, mixed_batch, set_active
from minift.models.gpt import GPT
from minift.models.llama import Llama
from minift.training import metrics_log
from minift.training.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, save_weights, \
    seed_everything
from minift.training.config import TrainConfig, lr_factor
from minift.training.data import pad_to_longest
from minift.training.feed import batch_at, tokens_in
from minift.training.forward import model_forward, pick_device, to_device
from minift.training.loop import TrainResult, make_optimizer, progress_bar, record_eval, state_json


@dataclass
class Job:
    name: str                    # the adapter's name on the model
    lora: LoRAConfig
    batches: list[dict]          # this job's training batches (``data.batches``)
    cfg: TrainConfig             # lr, steps, schedule, ..., out_dir, resume, save_every, eval_every, patience
    lr_ratio: float | None = None                                  # LoRA+: lr of B / lr of A
    eval_fn: Callable[[nn.Module], dict] | None = None             # dev metrics, with this job's adapter active
    init_rng: torch.Tensor | None = None  # CPU RNG state A is drawn from (None: torch.manual_seed(cfg.seed))
    modules: dict[str, nn.Module] | None = None  # its own start of a module to save (a new classification head)


@dataclass
class ManyResult:
    jobs: dict[str, TrainResult] = field(default_factory=dict)    # job -> what ``train`` would return
    interrupted: bool = False
    tokens_per_s: float = 0.0                                      # every job's tokens, per second of the run

    @property
    def losses(self) -> dict[str, list[float]]:                    # job -> one loss per optimizer step
        return {n: r.losses for n, r in self.jobs.items()}


def add_jobs(model: nn.Module, jobs: list[Job]) -> None:
    """Freeze the base and add each job's adapter. Every adapter starts as ``lora.apply`` makes
    one (A Kaiming-uniform from the job's RNG, B zero), so adding them changes no output."""
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must differ, got {', '.join(names)}")
    for j in jobs:
        if j.cfg.grad_accum != 1:
            raise ValueError(f"job {j.name}: train_many runs grad_accum 1 (give a larger batch instead)")
        if "lm_head" in j.lora.targets:  # each job's loss is taken from the hidden states, the head per job
            raise ValueError(f"job {j.name}: train_many does not adapt lm_head (each job's loss reads the "
                             f"shared head); leave lm_head out of the targets")
        if j.cfg.bf16 != jobs[0].cfg.bf16:
            raise ValueError(f"job {j.name}: every job must agree on bf16 (one forward runs them all)")
    kinds = {j.batches[0]["labels"].dim() for j in jobs}
    if len(kinds) > 1:
        raise ValueError("the jobs mix tasks: every job's labels must be per token (causal LM) or per example")
    widths = {m.out_features for j in jobs for m in (j.modules or {}).values() if isinstance(m, nn.Linear)}
    if 1 in widths and len(widths) > 1:  # the loss is chosen by the mixed logits' width
        raise ValueError("a one-output (regression) head cannot train beside classification heads")
    freeze_all(model)
    for j in jobs:
        if j.init_rng is None:
            torch.manual_seed(j.cfg.seed)
        else:
            torch.set_rng_state(j.init_rng)
        try:
            add_adapter(model, j.name, j.lora, j.modules)
        except ValueError as e:  # a target that matches nothing, a rank too large for a layer
            raise ValueError(f"job {j.name}: {e}") from None


def train_many(model: nn.Module, jobs: list[Job], device: str = "cpu", *, progress: bool = False,
               on_start: Callable[[dict[str, int]], None] | None = None) -> ManyResult:
    """Train every job's adapter (``add_jobs`` first) until each has done its ``cfg`` steps or
    stopped early. ``on_start(steps done per job)`` runs once the checkpoints to resume are loaded.
    A KeyboardInterrupt returns with ``interrupted=True`` after saving the unfinished jobs; any
    other exception saves the jobs that moved, then propagates."""
    if not jobs:
        raise ValueError("train_many needs at least one job")
    dev = pick_device(device)
    model.to(dev)
    runs = [_JobRun(model, j, dev) for j in jobs]
    resumed = [r.resume() for r in runs]  # every checkpoint read and checked before any log changes
    if not any(resumed):
        seed_everything(jobs[0].cfg.seed)  # only dropout (the base's, the adapters') draws from it
    for r in runs:
        r.start_log()
    if on_start is not None:
        on_start({r.job.name: r.step for r in runs})
    res = ManyResult({r.job.name: r.res for r in runs})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and jobs[0].cfg.bf16)
    bar = progress_bar(sum(r.total for r in runs), sum(r.step for r in runs), progress, "train-many (job steps)")
    t0, tokens, snap, updating, error = time.perf_counter(), 0, rng_state(), False, None
    pending: list = []  # (jobs, their (step, lr), their losses on the device) of steps not yet read back
    try:
        model.train()
        for r in runs:
            if r.state.get("eval_pending"):  # Ctrl-C stopped this evaluation: finish the step first
                r.after_step()
        while live := [r for r in runs if r.live]:
            snap = rng_state()  # what a checkpoint of the steps done so far restores
            parts = [batch_at(r.job.batches, r.step, r.cfg) for r in live]
            rows = [r.job.name for r, b in zip(live, parts) for _ in range(b["input_ids"].shape[0])]
            batch = _concat(parts)
            tokens += tokens_in(batch)
            batch = to_device(batch, dev)
            with autocast, mixed_batch(model, rows):
                total, losses = _job_losses(model, batch, [b["input_ids"].shape[0] for b in parts])
            total.backward()
            updating = True  # from here until every job has recorded its step: no checkpoint
            for r in live:
                r.update()
            # the losses stay on the device until a job needs them on the host (one read for all)
            pending.append((live, [(r.step, r.opt.param_groups[0]["lr"]) for r in live], losses))
            if any(r.reads_losses() for r in live):
                _read_back(pending)
            updating, snap = False, rng_state()
            bar.update(len(live))
            bar.set_postfix(jobs=len(live))
            for r in live:  # every evaluation due is pending until it has run (a Ctrl-C in one keeps the rest)
                r.state["eval_pending"] = r.eval_due()
            for r in live:
                r.after_step()
    except KeyboardInterrupt:
        res.interrupted = True
        if updating:  # some adapters may be half-updated: keep the previous checkpoints
            raise
    except Exception as e:  # a failure: keep the steps done so far (unless adapters are half-updated)
        if updating:
            raise
        error = e
    finally:
        bar.close()
        model.eval()
    if not updating:
        _read_back(pending)
    res.tokens_per_s = tokens / max(time.perf_counter() - t0, 1e-9)
    for r in runs:
        r.end(snap, error)
    if error is not None:
        raise error
    return res


def _read_back(pending: list) -> None:
    """Record the losses of the steps in ``pending`` (one device-to-host copy for all), then clear it."""
    if not pending:
        return
    values = torch.cat([t for _, _, t in pending]).tolist()
    i = 0
    for runs, at, _ in pending:
        for r, (step, lr) in zip(runs, at):
            r.record(values[i], step, lr)
            i += 1
    pending.clear()


class _JobRun:
    """One job inside ``train_many``: its optimizer, schedule, position, history and files."""

    def __init__(self, model: nn.Module, job: Job, device: torch.device):
        if len(job.batches) == 0:
            raise ValueError(f"job {job.name}: no training batches")
        self.model, self.job, self.cfg, self.res = model, job, job.cfg, TrainResult()
        self.total = job.cfg.total_steps(len(job.batches))
        self.warmup = job.cfg.warmup_steps(self.total)
        with alone(model, job.name):  # the optimizer ``train`` builds for this adapter alone
            groups = lora.param_groups(model, job.cfg.lr, job.lr_ratio, job.cfg.weight_decay) if job.lr_ratio else None
            self.opt = make_optimizer(model, job.cfg, groups, device=device)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.optimize = fast_adamw.chosen(self.opt, job.cfg.fast)  # as train's loop clips and steps
        self.out = Path(job.cfg.out_dir) if job.cfg.out_dir else None
        self.log_path = job.cfg.log_path or (str(self.out / "metrics.jsonl") if self.out else None)

    def resume(self) -> bool:
        """Load ``out_dir/last`` when resuming; True if one loaded."""
        self.state = {"step": 0, "losses": [], "evals": [], "best": None, "bad_evals": 0}
        ckpt = latest_checkpoint(self.out) if (self.cfg.resume and self.out) else None
        if ckpt is not None:
            with alone(self.model, self.job.name):
                self.state = load_checkpoint(ckpt, self.model, self.opt)
            self.res.checkpoint = str(ckpt)
        self.resumed = ckpt is not None
        self.step = self.start_step = self.state["step"]
        self.res.losses, self.res.evals, self.res.best = self.state["losses"], self.state["evals"], self.state["best"]
        self.res.stopped_early = bool(self.state.get("stopped_early"))
        self.finished = not self.live and not self.state.get("eval_pending")  # nothing left: no file to rewrite
        return self.resumed

    def start_log(self) -> None:
        """The metrics log cut back to the checkpoint (steps after it are redone), or emptied."""
        if self.resumed:
            metrics_log.truncate(self.log_path, self.step, drop_eval=self.state.get("eval_pending", False))
        elif self.log_path and Path(self.log_path).is_file():
            Path(self.log_path).write_text("")  # a fresh start: no lines of an earlier run

    @property
    def live(self) -> bool:
        return self.step < self.total and not self.res.stopped_early

    def update(self) -> None:
        """The scheduled lr, gradient clipping, the AdamW step, zero_grad; the step is done."""
        opt, cfg = self.opt, self.cfg
        for g, base in zip(opt.param_groups, self.base_lrs):
            g["lr"] = base * lr_factor(self.step, self.total, self.warmup, cfg.schedule)
        self.optimize(cfg.max_grad_norm)
        opt.zero_grad(set_to_none=True)
        self.step += 1

    def record(self, loss: float, step: int, lr: float) -> None:
        self.res.losses.append(loss)
        metrics_log.append(self.log_path, {"step": step, "loss": loss, "lr": lr})

    def reads_losses(self) -> bool:
        """Whether this step needs the job's losses on the host: its log interval, an evaluation,
        a checkpoint or its last step."""
        c = self.cfg
        return (self.step % c.log_every == 0 or self.eval_due() or not self.live
                or bool(self.out and c.save_every and self.step % c.save_every == 0))

    def eval_due(self) -> bool:
        every = self.cfg.eval_every
        return self.job.eval_fn is not None and (bool(every and self.step % every == 0) or self.step == self.total)

    def after_step(self) -> None:
        """The pending evaluation (early stopping), a checkpoint when due, and the job's end."""
        if self.state.get("eval_pending") and self.job.eval_fn is not None:
            self.res.stopped_early = self.evaluate()
            self.state["eval_pending"] = False
        if self.out and self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.live:
            self.save()
        if not self.live:  # done: its final checkpoint and loss curve, as ``train`` leaves them
            self.finish()

    def evaluate(self) -> bool:
        """``eval_fn`` with this job's adapter active; the best (``best/``); True: stop early.
        All or nothing, as in ``train``: an interrupted evaluation leaves no record and stays pending."""
        res, state, cfg = self.res, self.state, self.cfg
        n_evals, best, bad_evals = len(res.evals), res.best, state["bad_evals"]
        try:
            self.model.eval()
            set_active(self.model, self.job.name)
            with torch.no_grad():
                metrics = {k: float(v) for k, v in self.job.eval_fn(self.model).items()}
            return record_eval(res, state, self.step, metrics, cfg, self.log_path,
                               self._save_best if self.out else None, who=f"job {self.job.name}: ")
        except BaseException:
            del res.evals[n_evals:]
            res.best, state["bad_evals"] = best, bad_evals
            metrics_log.truncate(self.log_path, self.step, drop_eval=True)
            raise
        finally:
            set_active(self.model, None)
            self.model.train()

    def _save_best(self) -> None:
        with alone(self.model, self.job.name):
            save_weights(self.model, self.out / "best")

    def save(self, rng: dict | None = None) -> None:
        state = state_json(self.step, self.res, self.state)
        with alone(self.model, self.job.name):
            self.res.checkpoint = str(save_checkpoint(self.out, self.model, self.opt, state, rng=rng))

    def finish(self) -> None:
        self.finished = True
        self.save_last()

    def save_last(self, rng: dict | None = None) -> None:
        """The checkpoint and loss curve ``train`` leaves at the end of a run."""
        if self.out:
            self.save(rng)
            if self.cfg.plot:
                metrics_log.plot_losses(self.res.losses, self.res.evals, self.out / "loss.png")

    def end(self, snap: dict, error: Exception | None) -> None:
        """After the run: an unfinished job saves where it stands, with the RNG of ``snap``
        (after a failure, only a job that moved since it started)."""
        self.opt.zero_grad(set_to_none=True)  # the gradients of a step in flight, if any
        self.res.steps = self.step
        self.res.interrupted = not self.finished
        if not self.finished and (error is None or self.step > self.start_step or self.state.get("eval_pending")):
            self.save_last(snap)


@contextlib.contextmanager
def alone(model: nn.Module, name: str, cfg: LoRAConfig | None = None):
    """Within the ``with``, ``model`` shows adapter ``name`` alone, as the plain LoRA model that
    ``lora.apply(model, cfg)`` makes (the same Parameters; ``cfg`` recorded as ``lora.apply`` records
    it, for the adapter files): ``train``'s optimizer groups, checkpoints and adapter files."""
    with as_single(model, name), lora_config_as(model, cfg):
        yield model


def _concat(parts: list[dict]) -> dict:
    """The jobs' batches as one: each padded to the longest (masked; no target on padding)."""
    parts = [b if "attention_mask" in b else {**b, "attention_mask": torch.ones_like(b["input_ids"])} for b in parts]
    padded = pad_to_longest(parts)
    keys = set.intersection(*(set(b) for b in padded))
    return {k: torch.cat([b[k] for b in padded]) for k in keys}


def _job_losses(model: nn.Module, batch: dict, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over every job's rows: (the sum of the jobs' losses, to backpropagate; each job's
    mean loss on its own rows (K,), fp32 or wider, detached), each as ``model``'s own loss computes it alone.
    A language model's loss is taken from the final hidden states through the model's ``lm_loss``;
    fused by ``minift.fast`` (no full logits formed), it is one pass for every job
    (``fast.loss.grouped_lm_loss``), otherwise one call per job."""
    lm = isinstance(model, (GPT, Llama))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if lm:
        x = model(**inputs, output_hidden_states=True, compute_logits=False).hidden_states[-1]
    else:
        logits = model_forward(model, inputs).logits
    if lm and isinstance(model.lm_loss, FusedLMLoss) and torch.is_grad_enabled():
        # the head matrix the model's own loss reads: GPT's tied wte, Llama's embed_tokens or plain
        # lm_head (add_jobs refuses an adapter on lm_head)
        w = model.wte.weight if isinstance(model, GPT) else (
            model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight)
        return model.lm_loss.grouped(x, w, batch["labels"], sizes)
    out, start = [], 0
    for n in sizes:
        rows, y = slice(start, start + n), batch["labels"][start:start + n]
        if isinstance(model, GPT):
            out.append(model.lm_loss(x[rows], model.wte.weight, y))
        elif lm:
            out.append(model.head(x[rows], y, False)[1])
        elif logits.shape[-1] == 1:  # BertClassifier's own losses (add_jobs refuses one-output heads mixed with others)
            out.append(F.mse_loss(logits[rows].squeeze(-1).float(), y.float()))
        else:  # a narrower head's -inf columns add exactly 0 to the softmax's sum
            out.append(F.cross_entropy(logits[rows].float(), y, reduction="sum") / (y != -100).sum().clamp_min(1))
        start += n
    losses = torch.stack(out)
    return losses.sum(), losses.detach().float()


__all__ = ["Job", "ManyResult", "add_jobs", "train_many", "alone"]
