"""The training loop: explicit, flat, top to bottom. Every part is built elsewhere and passed in.

One optimizer step = one accumulation window of ``grad_accum_steps`` micro-batches per process:

  1. lr for this step, from a pure function of the step (optim.lr_at)
  2. collate the whole window first, so its loss normaliser (the summed weight of its target
     tokens, over all processes) is known before the first backward
  3. per micro-batch: forward, *sum* of weighted token losses, backward of sum * world / N.
     This is the one place the loss is scaled. DDP averages gradients over processes, hence the
     factor ``world``; the result is exactly d(mean token loss over the window)/d(params),
     however the tokens fall into micro-batches and processes. A mean of micro-batch means
     would over-weight short answers.
  4. clip (the pre-clip norm is logged), optimizer step, zero_grad. In debug mode
     (medqa_loop.debug) user hooks and the NaN/inf guard run just before the clip.
  5. log; every ``eval_every`` steps evaluate (then sample answers, if given); at each epoch end
     evaluate and save the adapter
  6. hand the position to ``after_step`` (medqa_loop.state saves a resumable training state)

We do not use ``accelerator.accumulate``: it decides when to sync from its own micro-step
counter, which drifts from ours on a short last window. ``no_sync`` on all but the last
micro-batch gives the same communication saving with no hidden state.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from medqa_loop.config import Config
from medqa_loop.data import accumulation_windows, arrange_window, epoch_order, steps_per_epoch
from medqa_loop.debug import OFF, Debugger, schedule_warnings
from medqa_loop.distributed import zero_weight_batch
from medqa_loop.evaluation import evaluate
from medqa_loop.losses import target_tokens, target_weight, weighted_loss_sum
from medqa_loop.metrics import MetricsLog, peak_memory_gb, perplexity
from medqa_loop.model import model_logits
from medqa_loop.optim import lr_at
from medqa_loop.state import Position

Batch = dict[str, torch.Tensor]
EPS = 1e-8  # floor of the loss normaliser: an all-masked window must not divide by 0


def window_batches(
    window: list[list[int]], examples: list[dict], cfg: Config, collate_fn, device
) -> list[Batch]:
    """The micro-batches run for one window: its pairs regrouped as ``data.batching`` says
    (data.arrange_window), collated, on ``device``. Replay rebuilds a step with this too."""
    lengths = [len(e["input_ids"]) for e in examples]
    micro_batches = arrange_window(
        window, lengths, cfg.data.batching, cfg.train.micro_batch_size, cfg.data.pack_tokens
    )
    return [
        {k: v.to(device) for k, v in collate_fn([examples[i] for i in mb]).items()}
        for mb in micro_batches
    ]


def forward_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Sum of weighted token losses of one batch (no normalisation: the caller divides once)."""
    return weighted_loss_sum(model_logits(model, batch), batch["labels"], batch["loss_weights"])


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
) -> torch.Tensor:
    """Forward + backward every micro-batch of one window; return the local (unscaled) loss sum.

    The one place the loss is scaled: by world / normaliser (see the module docstring). An
    all-masked window has a zero loss sum; the clamp keeps its gradient 0 rather than NaN.
    ``on_micro_batch(i, batch, loss_sum)`` runs after each micro-batch's backward (the debugger
    attributes the gradient to micro-batches there).
    """
    scale = accelerator.num_processes / normaliser.clamp(min=EPS)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        # Gradients are all-reduced once per window, on its last micro-batch.
        sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            micro_loss = forward_loss_sum(model, batch)
            accelerator.backward(micro_loss * scale.to(micro_loss.dtype))
        loss_sum += micro_loss.detach().float()
        if on_micro_batch is not None:
            on_micro_batch(i, batch, micro_loss.detach())
    return loss_sum


def train(
    cfg: Config,
    accelerator,
    model,
    optimizer: torch.optim.Optimizer,
    train_examples: list[dict],
    val_examples: list[dict],
    collate_fn: Callable[[list[dict]], Batch],
    save_checkpoint: Callable[[str], object],
    log: MetricsLog,
    sample_answers: Callable[[int], object] | None = None,
    start: Position = Position(),
    after_step: Callable[[int, int, int, int, bool], None] | None = None,
    debugger: Debugger = OFF,
) -> dict:
    """Run the configured epochs (or ``train.max_steps``); return the last logged values.

    ``sample_answers(step)``, when given, runs after each evaluation (see medqa_loop.generate).
    ``start`` is where a resumed run stands (its model, optimizer and RNGs already restored):
    the windows before it are skipped, not replayed, since the data order is a pure function of
    (seed, epoch). ``after_step(step, epoch, windows_done, windows_in_epoch, last)`` runs after
    every step; it may raise to stop the run (state.Interrupted).
    ``debugger`` (medqa_loop.debug) sees each step at three points; the default does nothing.
    """
    t = cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes
    per_epoch = steps_per_epoch(len(train_examples), t.micro_batch_size, t.grad_accum_steps, world)
    total_steps = per_epoch * t.epochs if t.max_steps is None else min(t.max_steps, per_epoch * t.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    # Clipping at 0 would zero every update; 0 means "don't clip" (the norm is still logged).
    clip_at = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
    for message in schedule_warnings(t, total_steps):
        accelerator.print(f"warning: {message}")

    def run_eval(step: int, epoch: float, max_batches: int | None = t.eval_max_batches) -> float:
        r = evaluate(accelerator, model, val_examples, collate_fn, t.eval_batch_size, max_batches)
        log.write(
            step=step, epoch=round(epoch, 4), eval_loss=r.loss, eval_ppl=perplexity(r.loss),
            eval_token_acc=r.token_acc,
        )
        if sample_answers is not None:
            sample_answers(step)
        return r.loss

    # A short eval before the first step: a broken eval path or a NaN model fails in seconds,
    # not after the first eval_every steps; it also records the starting loss.
    last = {"step": start.step}
    if t.sanity_eval_batches and start.step == 0:  # a resumed run logged its own at step 0
        last["eval_loss"] = run_eval(0, 0.0, t.sanity_eval_batches)

    model.train()
    step = start.step
    # A context manager, so that a run stopped by an exception (NaN guard, signal) closes its bar.
    with tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="train") as bar:
        for epoch in range(start.epoch, t.epochs):
            order = epoch_order(len(train_examples), cfg.seed, epoch)
            windows = accumulation_windows(order, t.micro_batch_size, t.grad_accum_steps, rank, world)
            done = start.window if epoch == start.epoch else 0  # windows trained before a resume
            for window_index, window in enumerate(windows[done:], start=done):
                if step >= total_steps:
                    break  # train.max_steps reached mid-epoch
                started = time.perf_counter()
                lr = lr_at(step, t.lr, t.warmup_steps, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                batches = window_batches(window, train_examples, cfg, collate_fn, accelerator.device)
                counts = window_counts(accelerator, batches)
                if not batches:  # no share of an epoch's short last window; it must still join DDP
                    batches = [zero_weight_batch(train_examples[0], collate_fn, accelerator.device)]
                loss_sum = backward_window(accelerator, model, batches, counts[0], debugger.watch(step + 1))
                # The window's mean token loss stays on the GPU until clip and step are queued:
                # reading it here would idle the GPU while the CPU queues them.
                mean_loss = accelerator.reduce(loss_sum, reduction="sum") / counts[0].clamp(min=EPS)
                # Debug mode: user hooks, and the NaN/inf guard (raises, or drops the gradients to skip).
                debugger.before_clip(step + 1, model, batches, mean_loss)

                grad_norm = accelerator.clip_grad_norm_(params, clip_at)  # returns the pre-clip norm
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss = mean_loss.item()  # the step's one wait for the GPU

                elapsed = time.perf_counter() - started
                epoch_pos = epoch + (window_index + 1) / len(windows)
                last = {
                    "step": step,
                    "epoch": round(epoch_pos, 4),
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "target_tokens": int(counts[1]),
                    "tokens_per_s": counts[2].item() / elapsed,
                    "samples_per_s": counts[3].item() / elapsed,
                    "step_time_s": elapsed,
                }
                if (peak := peak_memory_gb(accelerator.device)) is not None:
                    last["peak_gb"] = peak
                last.update(debugger.after_step(step, last))  # debug: trace line; a skip marks its step
                log.write(**last)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{float(grad_norm):.3f}",
                    tok_s=f"{last['tokens_per_s']:.0f}",
                )

                if window_index == len(windows) - 1:
                    last["eval_loss"] = run_eval(step, epoch + 1.0)
                    save_checkpoint(f"epoch-{epoch + 1}")
                elif step % t.eval_every == 0:
                    last["eval_loss"] = run_eval(step, epoch_pos)
                if after_step is not None:
                    after_step(step, epoch, window_index + 1, len(windows), step >= total_steps)
            if step >= total_steps:
                break
    save_checkpoint("final")
    return last
