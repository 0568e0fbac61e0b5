"""The training loop: explicit, flat, top to bottom. Everything it runs on is built elsewhere
(train.prepare_run) and handed in; what it hands work to (metrics, states, sampling, profiling,
debugging) is one ``Hooks`` object, called at fixed points you can read below.

One optimizer step = one accumulation window of ``grad_accum_steps`` micro-batches per process:

  1. lr for this step, from a pure function of the step (optim.lr_at)
  2. collate the whole window first, so its loss normaliser (the summed weight of its target
     tokens, over all processes) is known before the first backward
  3. per micro-batch: forward, *sum* of weighted token losses, backward of sum * world / N.
     This is the one place the loss is scaled. DDP averages gradients over processes, hence the
     factor ``world``; the result is exactly d(mean token loss over the window)/d(params),
     however the tokens fall into micro-batches and processes. A mean of micro-batch means
     would over-weight short answers. With ``model.cuda_graphs`` (kernels.graphs) a micro-batch's
     forward and backward are the replay of one CUDA graph, scaled by the same factor.
  4. clip, optimizer step, zero_grad (optim.optimizer_step); a step whose loss or gradient norm
     is not finite applies no update, then stops the run with the state of the last good step
     (``train.nan_policy: stop``) or is counted and passed over (``skip``). Debug mode adds, just
     before, user hooks and where the non-finite value was born (medqa_loop.debug.trace)
  5. log; every ``eval_every`` steps and at each epoch end evaluate (then sample answers, if
     asked), keep the adapter with the lowest eval loss in best/, stop early if asked; at each
     epoch end save the adapter
  6. save a resumable training state when one is due; a SIGTERM/SIGINT received during the step
     stops the run here, after that save

Adapters and states are copied to host memory where the loop saves them and written by a
background thread (checkpoint.writer), so the GPU goes on with the next window; the loop waits
for the files only where it reports them: a stop, and its end.

We do not use ``accelerator.accumulate``: it decides when to sync from its own micro-step
counter, which drifts from ours on a short last window. ``no_sync`` on all but the last
micro-batch gives the same communication saving with no hidden state. Nor a prepared scheduler:
Accelerate's steps once per process unless told otherwise; the lr is set on the param groups.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from medqa_loop.batching import (
    Batch, accumulation_windows, epoch_order, eval_micro_batches, run_steps, window_batches, zero_weight_batch,
)
from medqa_loop.checkpoint.adapter import save_adapter, save_best_adapter
from medqa_loop.checkpoint.state import Interrupted, Position, StateSaver, rng_state
from medqa_loop.checkpoint.writer import CheckpointWriter
from medqa_loop.evaluation import Best, best_so_far, evaluate
from medqa_loop.losses import target_tokens, target_weight
from medqa_loop.metrics import MetricsLog, peak_memory_gb, perplexity, read_metrics
from medqa_loop.model import model_loss_sum
from medqa_loop.optim import lr_at, optimizer_step, schedule_warnings, set_lr

if TYPE_CHECKING:
    from medqa_loop.debug.profiling import StepProfiler
    from medqa_loop.debug.trace import GradientDebugger
    from medqa_loop.kernels.graphs import MicroBatchGraphs
    from medqa_loop.train import PreparedRun

EPS = 1e-8  # floor of the loss normaliser: an all-masked window must not divide by 0


@dataclass
class Hooks:
    """What the loop hands work to, besides its own maths; each is called at one point of a step
    (module docstring), and only ``log`` is required."""

    log: MetricsLog  # a line per step and per evaluation
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)  # adapters, states: in the background
    sample_answers: Callable[[int], object] | None = None  # after each evaluation (generate.eval_sampler)
    states: StateSaver | None = None  # training states, and the stop on SIGTERM/SIGINT
    profiler: StepProfiler | None = None  # torch.profiler around train.profile_steps
    debugger: GradientDebugger | None = None  # debug.enabled: trace, NaN/inf guard, hooks


def window_counts(accelerator, batches: list[Batch]) -> torch.Tensor:
    """[summed weight (the loss normaliser), target tokens, non-pad tokens, pairs] of a window,
    summed over all its micro-batches on all processes."""
    counts = torch.tensor(
        [
            [float(target_weight(b)) for b in batches],
            [float(target_tokens(b)) for b in batches],
            [float(b["attention_mask"].sum()) for b in batches],
            [float(len(b["rows"])) for b in batches],  # pairs, not rows: a packed row holds many
        ],
        dtype=torch.float64,
        device=accelerator.device,
    ).sum(dim=1)
    return accelerator.reduce(counts, reduction="sum")


def backward_window(
    accelerator,
    model,
    batches: list[Batch],
    normaliser: torch.Tensor,
    on_micro_batch: Callable[[int, Batch, torch.Tensor], None] | None = None,
    graphs: MicroBatchGraphs | None = None,
) -> torch.Tensor:
    """Forward + backward every micro-batch of one window; return the local (unscaled) loss sum.

    The one place the loss is scaled: by world / normaliser (see the module docstring). An
    all-masked window has a zero loss sum; the clamp keeps its gradient 0 rather than NaN.
    ``on_micro_batch(i, batch, loss_sum)`` runs after each micro-batch's backward (the debugger
    attributes the gradient to micro-batches there). With ``graphs`` (model.cuda_graphs, one
    process) each micro-batch's forward and backward are the replay of a CUDA graph: the same
    maths, with this scale.
    """
    scale = accelerator.num_processes / normaliser.clamp(min=EPS)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        if graphs is not None:
            micro_loss = graphs.run(batch, scale)
        else:
            # Gradients are all-reduced once per window, on its last micro-batch.
            sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
            with sync:
                micro_loss = model_loss_sum(model, batch)
                accelerator.backward(micro_loss * scale.to(micro_loss.dtype))
        loss_sum += micro_loss.detach().float()
        if on_micro_batch is not None:
            on_micro_batch(i, batch, micro_loss.detach())
    return loss_sum


def train(run: PreparedRun, hooks: Hooks) -> dict:
    """Run the configured epochs (or ``train.max_steps``, or until early stopping) of ``run.cfg``;
    return the last logged values.

    ``run.start`` is where a resumed run stands (its model, optimizer and RNGs already restored):
    the windows before it are skipped, not replayed, since the data order is a pure function of
    (seed, epoch); the best eval loss so far is read back from metrics.jsonl.
    """
    cfg, t = run.cfg, run.cfg.train
    accelerator, model, optimizer, examples = run.accelerator, run.model, run.optimizer, run.train_examples
    rank, world = accelerator.process_index, accelerator.num_processes
    total_steps = run_steps(len(examples), t, world)
    params = [p for p in model.parameters() if p.requires_grad]
    debugger = hooks.debugger
    for message in schedule_warnings(t, total_steps):
        accelerator.print(f"warning: {message}")
    best = best_so_far(read_metrics(hooks.log.path)) if run.start.step and hooks.log.path.is_file() else Best()
    skipped = 0  # non-finite steps whose update was dropped (train.nan_policy=skip)

    val_lengths = [len(e["input_ids"]) for e in run.val_examples]

    def run_eval(step: int, epoch: float, max_batches: int | None = t.eval_max_batches) -> float:
        started = time.perf_counter()
        micro_batches = eval_micro_batches(
            val_lengths, cfg.data.batching, t.eval_batch_size, cfg.data.pack_tokens, max_batches
        )
        r = evaluate(accelerator, model, run.val_examples, run.collate_fn, micro_batches, run.graphs)
        hooks.log.write(
            step=step, epoch=round(epoch, 4), eval_loss=r.loss, eval_ppl=perplexity(r.loss),
            eval_token_acc=r.token_acc, eval_time_s=time.perf_counter() - started,
        )
        if accelerator.is_main_process:  # above the progress bar, not in it
            tqdm.write(f"step {step}: eval loss {r.loss:.4f}, perplexity {perplexity(r.loss):.2f}, token accuracy {r.token_acc:.3f}")
        if hooks.sample_answers is not None:
            hooks.sample_answers(step)
        return r.loss

    # A short eval before the first step: a broken eval path or a NaN model fails in seconds,
    # not after the first eval_every steps; it also records the starting loss. Partial, so it
    # never counts as the best.
    step = run.start.step
    if hooks.profiler is not None:
        hooks.profiler.start(step + 1)  # step 1's recording includes the sanity eval
    last = {"step": step}
    if t.sanity_eval_batches and step == 0:  # a resumed run logged its own at step 0
        last["eval_loss"] = run_eval(0, 0.0, t.sanity_eval_batches)

    model.train()
    stop_early = False
    # A context manager, so that a run stopped by an exception (non-finite step, signal) closes its bar.
    with tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="train") as bar:
        for epoch in range(run.start.epoch, t.epochs):
            order = epoch_order(len(examples), cfg.seed, epoch)
            windows = accumulation_windows(order, t.micro_batch_size, t.grad_accum_steps, rank, world)
            done = run.start.window if epoch == run.start.epoch else 0  # windows trained before a resume
            for window_index, window in enumerate(windows[done:], start=done):
                if step >= total_steps:
                    break  # train.max_steps reached mid-epoch
                # 1. lr
                started = time.perf_counter()
                lr = lr_at(step, t.lr, t.warmup_steps, total_steps)
                set_lr(optimizer, lr)
                rng = rng_state()  # a non-finite step's state is saved as it was before its window

                # 2.-3. the window: its counts first, then forward and backward per micro-batch
                batches = window_batches(window, examples, cfg, run.collate_fn, accelerator.device)
                counts = window_counts(accelerator, batches)
                if not batches:  # no share of an epoch's short last window; it must still join DDP
                    batches = [zero_weight_batch(examples[0], run.collate_fn, accelerator.device)]
                watch = debugger.watch(step + 1) if debugger is not None else None
                loss_sum = backward_window(accelerator, model, batches, counts[0], watch, run.graphs)
                mean_loss = accelerator.reduce(loss_sum, reduction="sum") / counts[0].clamp(min=EPS)

                # 4. debug mode: user hooks, snapshots, where a non-finite value was born; then the
                # update, which AdamW drops on the device if the loss or the gradient norm is not
                # finite. Only then the step's one wait for the GPU: reading the loss earlier would
                # idle the GPU while the CPU queues clip and step.
                found = debugger.before_clip(step + 1, model, batches, mean_loss) if debugger is not None else None
                grad_norm, finite = optimizer_step(accelerator, optimizer, params, t.max_grad_norm, mean_loss)
                loss, grad_norm, finite = torch.stack([mean_loss.double(), grad_norm.double(), finite.double()]).tolist()
                step += 1
                if not finite:  # no update was applied
                    problem = non_finite_message(step, loss, grad_norm, batches, found)
                    if t.nan_policy == "stop":
                        last_good = Position.after(step - 1, epoch, window_index, len(windows))
                        saved = hooks.states.save(last_good, hooks.writer, rng, wait=True) if hooks.states is not None else None
                        raise NonFiniteError(step, problem, saved)
                    skipped += 1
                    accelerator.print(f"warning: {problem}; its update was skipped ({skipped} so far, train.nan_policy=skip)")

                # 5. log, evaluate (the best adapter, early stopping), the epoch's adapter
                elapsed = time.perf_counter() - started
                epoch_pos = epoch + (window_index + 1) / len(windows)
                last = {
                    "step": step,
                    "epoch": round(epoch_pos, 4),
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "target_tokens": int(counts[1]),
                    "tokens_per_s": counts[2].item() / elapsed,
                    "samples_per_s": counts[3].item() / elapsed,
                    "step_time_s": elapsed,
                }
                if (peak := peak_memory_gb(accelerator.device)) is not None:
                    last["peak_gb"], last["peak_reserved_gb"] = peak
                if not finite:
                    last["skipped_nonfinite"] = skipped
                if debugger is not None:
                    debugger.after_step(step, last, skipped=not finite)  # the grad_trace.jsonl line
                hooks.log.write(**last)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
                epoch_end = window_index == len(windows) - 1
                if epoch_end or step % t.eval_every == 0:
                    last["eval_loss"] = run_eval(step, epoch + 1.0 if epoch_end else epoch_pos)
                    best = best.after(step, last["eval_loss"])
                    if best.step == step:
                        save_best_adapter(accelerator, model, run.out, run.tokenizer, step, best.loss, hooks.writer)
                    stop_early = t.early_stopping_patience is not None and best.stale >= t.early_stopping_patience
                    if stop_early:
                        accelerator.print(
                            f"early stopping at step {step}: {best.stale} evaluations without a lower eval loss "
                            f"than {best.loss:.4f} (step {best.step}, in {run.out / 'best'})"
                        )
                if epoch_end:
                    save_adapter(accelerator, model, run.out / f"epoch-{epoch + 1}", run.tokenizer, hooks.writer)

                # 6. a training state when due; a signal received during the step stops here
                if hooks.profiler is not None:
                    hooks.profiler.stop(step)  # before the state save: a recording holds its step only
                if hooks.states is not None:
                    position = Position.after(step, epoch, window_index + 1, len(windows))
                    signum = hooks.states.signal_received()
                    if signum or hooks.states.due(position, last=step >= total_steps or stop_early):
                        saved = hooks.states.save(position, hooks.writer, wait=bool(signum))
                        if signum:
                            raise Interrupted(signum, step, saved)
                if hooks.profiler is not None:
                    hooks.profiler.start(step + 1)
                if stop_early:
                    break
            if step >= total_steps or stop_early:
                break
    save_adapter(accelerator, model, run.out / "final", run.tokenizer, hooks.writer)
    hooks.writer.wait()  # every adapter and state on disk before the run reports them
    return last


class NonFiniteError(ValueError):
    """A step's loss or gradient norm was not finite (train.nan_policy=stop): no update was
    applied, and the state of the last good step was saved."""

    def __init__(self, step: int, problem: str, saved: Path | None):
        self.step, self.saved = step, saved
        resume = (
            f"; the state of the last good step is in {saved}: resume with --resume auto (after lowering "
            "train.lr or train.max_grad_norm, with --force-resume)" if saved is not None else ""
        )
        super().__init__(f"{problem}. Stopped before its update{resume}")


def non_finite_message(step: int, loss: float, grad_norm: float, batches: list[Batch], found) -> str:
    """What went wrong at ``step``: the loss, the gradient norm, the window's rows (this
    process's), and in debug mode where it was found (``GradientDebugger.before_clip``)."""
    rows = sorted(r for b in batches for r in b["rows"].tolist())
    text = f"non-finite step {step}: loss {loss}, gradient norm {grad_norm}, the window's dataset rows {rows}"
    return text if found is None else f"{text}; {found.message}"
