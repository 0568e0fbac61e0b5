"""A training micro-batch's forward and backward replayed as one CUDA graph (``model.cuda_graphs``),
and an evaluation micro-batch's forward with its sums.

Eager, a packed micro-batch costs the CPU ~0.28 s whatever its size: ~1,500 Triton launches and
~160 autograd nodes for Mistral-7B's 32 layers. Below ~6k tokens a row that is more than the GPU
takes to run them, so small rows ran slower than large ones (BENCHMARKS.md). Captured once, the
same kernels replay from one launch.

A graph replays fixed shapes at fixed addresses, so:

* **rows are padded** (``padded_row``) to a multiple of ``ROW_MULTIPLE`` tokens, one graph per
  padded size, all in one memory pool (one size's activations are dead when another's run).
  The padding is pairs of pad tokens of at most ``pair_tokens`` each (FlashAttention's longest
  sequence), with no targets; their loss and gradient are exactly zero, and the real pairs
  attend only to themselves, so a padded row's loss and LoRA gradients are the unpadded row's
  (tests/kernels/test_graphs.py). Their matmuls are work the GPU does for nothing: under 512
  tokens a row.
* **inputs are copied** into the buffers the graph was captured with: the batch, the loss
  scale, and the LoRA dropout seeds, drawn on the host as an eager forward draws them
  (``kernels.seeds``), so the masks and every number are the eager path's.
* **gradients accumulate** into the ``.grad`` tensors the graph was captured with. The
  optimizer step drops ``.grad`` after each window; at the window's first micro-batch the same
  tensors are zeroed and put back.
* **evaluation** (``evaluate``) captures the eval forward and ``losses.eval_sums`` (the model in
  eval mode: no dropout, no seeds), one graph per padded size beside training's, in the same
  pool: evaluation then needs no memory of its own, which within a memory limit it would not
  get back from the pool.

The first micro-batch of each size runs eagerly (padded, its loss and gradients counted like
any other), which also runs Triton's autotuning and cuBLAS's set-up outside the capture, and is
then captured; both in the graphs' memory pool and on their stream, so the capture reuses the
eager run's activation memory instead of holding its own beside it. A capture that fails leaves
graphs off for the run with a warning; the step is unaffected (a capture records kernels
without running them).

Not covered, so the loop runs eagerly: several processes (DDP's gradient hooks run in Python
during backward, which a replay skips), padded batches, and debug mode (its hooks on modules).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from medqa_loop.batching import Batch

ROW_MULTIPLE = 512  # tokens: the padded sizes of the captured graphs
# model.cuda_graphs=auto uses graphs for rows of up to this many tokens (data.pack_tokens). In
# larger rows the GPU, not the CPU, sets the pace eagerly too, and the padding costs more than the
# launches save (BENCHMARKS.md).
AUTO_MAX_ROW = 4096


def graphs_unsupported(cfg, device=None, world: int = 1) -> str | None:
    """Why this run's micro-batches cannot replay as CUDA graphs (on ``device`` with ``world``
    processes, where given), or None."""
    if cfg.data.batching != "pack":
        return f"data.batching={cfg.data.batching} (graphs replay packed rows)"
    if not cfg.model.fused_ops:
        return "model.fused_ops=false (graphs replay the fused path, which reads its dropout seeds on the device)"
    if cfg.model.attn_implementation != "varlen" or cfg.model.dtype == "float32":
        return (f"model.attn_implementation={cfg.model.attn_implementation} with model.dtype={cfg.model.dtype} "
                "(graphs replay FlashAttention over the pairs, varlen in bfloat16 or float16)")
    if cfg.debug.enabled:
        return "debug.enabled=true (its hooks on modules do not run in a replay)"
    if device is not None and torch.device(device).type != "cuda":
        return f"the run is on {torch.device(device).type}, not CUDA"
    if world > 1:
        return f"the run has {world} processes (DDP's gradient hooks do not run in a replay)"
    return None


def use_graphs(cfg, device=None, world: int = 1, rows: int | None = None) -> bool:
    """``model.cuda_graphs`` for this run (on ``device`` with ``world`` processes, in rows of up to
    ``rows`` tokens, where given; rows: data.pack_tokens, which the memory plan resolves where it
    is auto): auto = wherever they can run, for rows of up to AUTO_MAX_ROW tokens; true = wherever
    they can run, and a ConfigError elsewhere (loading the config checks what it can, the run the
    rest, before the base is loaded)."""
    from medqa_loop.config import ConfigError

    why = graphs_unsupported(cfg, device, world)
    if cfg.model.cuda_graphs is True and why is not None:
        raise ConfigError(f"config key 'model.cuda_graphs' is true, but {why}; set it to auto or false")
    rows = cfg.data.pack_tokens if rows is None else rows
    if cfg.model.cuda_graphs == "auto" and (rows == "auto" or rows > AUTO_MAX_ROW):
        return False
    return cfg.model.cuda_graphs is not False and why is None


def padded_tokens(tokens: int) -> int:
    """The size of the graph a row of ``tokens`` tokens replays in."""
    return max(-(-tokens // ROW_MULTIPLE), 1) * ROW_MULTIPLE


def padded_row(batch: Batch, tokens: int, slots: int, pair_tokens: int, pad_id: int) -> dict:
    """A packed one-row ``batch`` padded to ``tokens`` tokens with pairs of pad tokens (at most
    ``pair_tokens`` each, positions from 0, no targets), its pair boundaries to ``slots`` + 1
    entries (empty pairs at the end) and its targets to ``tokens`` rows of weight 0: the model
    inputs of a graph of that size, whatever the row holds. Tensor ops on the batch's device, no
    host read."""
    ids, n = batch["input_ids"], batch["input_ids"].size(1)
    pad, pairs = tokens - n, batch["cu_seq_lens"].numel() - 1
    if pad < 0 or pairs + -(-pad // pair_tokens) > slots:
        raise ValueError(f"a row of {n} tokens and {pairs} pairs does not fit a graph of {tokens} tokens and {slots} pairs")
    device, cu = ids.device, batch["cu_seq_lens"]
    steps = torch.arange(1, slots - pairs + 1, device=device, dtype=cu.dtype)
    targets = batch["target_positions"].numel()

    def extended(t: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, fill.to(t.dtype)], dim=-1)

    return {
        "input_ids": extended(ids, ids.new_full((1, pad), pad_id)),
        "position_ids": extended(batch["position_ids"], (torch.arange(pad, device=device) % pair_tokens)[None]),
        "cu_seq_lens": extended(cu, (n + steps * pair_tokens).clamp(max=tokens)),
        "longest_pair": pair_tokens,
        "target_positions": extended(batch["target_positions"], torch.zeros(tokens - targets, device=device)),
        "targets": extended(batch["targets"], torch.zeros(tokens - targets, device=device)),
        "target_weights": extended(batch["target_weights"], torch.zeros(tokens - targets, device=device)),
    }


def row_slots(lengths: list[int], tokens: int, pair_tokens: int) -> int:
    """Pair boundaries a graph of ``tokens`` tokens needs room for: the most pairs of these
    lengths a row can hold (its shortest ones), plus the padding's pairs."""
    held, total = 0, 0
    for length in sorted(lengths):
        if total + length > tokens:
            break
        held, total = held + 1, total + length
    return held + -(-tokens // pair_tokens)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the buffers each replay's batch is copied into
    output: torch.Tensor  # written by each replay: the loss sum (training), eval_sums (evaluation)


class MicroBatchGraphs:
    """Packed micro-batches as CUDA graphs, one per padded row size and kind (module docstring):
    ``run(batch, scale)`` does what ``(model_loss_sum(model, batch) * scale).backward()`` does
    and returns the loss sum; ``evaluate(batch)`` returns what evaluation's
    ``eval_sums(model_logits(model, batch), batch)`` does (the model in eval mode, no grad)."""

    def __init__(self, model, examples: list[dict], pad_id: int, say=print):
        """For ``model`` (patched by use_fused_ops) running on ``examples`` (tokenized pairs,
        training and validation: their lengths bound a row's pairs)."""
        from medqa_loop.kernels.patch import dropout_seeds

        self.model, self.pad_id, self.say = model, pad_id, say
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.pair_tokens = max(self.lengths)  # no pair is longer: FlashAttention's grid covers each
        self.seeds = dropout_seeds(model)
        self.graphs: dict[int, _Captured] = {}  # training's, by padded row size
        self.eval_graphs: dict[int, _Captured] = {}  # evaluation's
        self.slots: dict[int, int] = {}  # pair boundaries a row of each size has room for (row_slots)
        self.pool: torch.cuda.MemPool | None = None  # the graphs' memory, and their eager first runs'
        self.stream: torch.cuda.Stream | None = None  # where those run and the graphs are captured
        self.grads: list[torch.Tensor] | None = None  # the .grad tensors the graphs accumulate into
        self.scale: torch.Tensor | None = None
        self.seed_buffer: torch.Tensor | None = None
        self.off: str | None = None  # why graphs stopped, after a failed capture

    def run(self, batch: Batch, scale: torch.Tensor) -> torch.Tensor:
        tokens, row = self._padded(batch)
        self._bind_grads()
        captured = self.graphs.get(tokens)
        if captured is None:
            return self._run_eagerly_then_capture(self.graphs, tokens, row, scale)
        self.scale.copy_(scale)
        if self.seeds.count:
            self.seeds.refill(self.seed_buffer)
        return self._replay(captured, row)

    def evaluate(self, batch: Batch) -> torch.Tensor:
        tokens, row = self._padded(batch)
        captured = self.eval_graphs.get(tokens)
        if captured is None:
            return self._run_eagerly_then_capture(self.eval_graphs, tokens, row)
        return self._replay(captured, row)

    def _padded(self, batch: Batch) -> tuple[int, dict]:
        tokens = padded_tokens(batch["input_ids"].size(1))
        if tokens not in self.slots:
            self.slots[tokens] = row_slots(self.lengths, tokens, self.pair_tokens)
        return tokens, padded_row(batch, tokens, self.slots[tokens], self.pair_tokens, self.pad_id)

    @staticmethod
    def _replay(captured: _Captured, row: dict) -> torch.Tensor:
        for key, buffer in captured.inputs.items():
            buffer.copy_(row[key])
        captured.graph.replay()
        return captured.output.clone()  # the next replay of this graph overwrites it

    def _bind_grads(self) -> None:
        """Each parameter's ``.grad`` is the tensor the graphs accumulate into: where the optimizer
        step dropped it (a window's first micro-batch), zeroed and put back."""
        if self.grads is None:
            return
        dropped = [(p, g) for p, g in zip(self.params, self.grads) if p.grad is not g]
        if not dropped:
            return
        if any(p.grad is not None for p, _ in dropped):
            raise RuntimeError("a LoRA parameter's .grad was replaced during a window; CUDA graphs accumulate into their own")
        torch._foreach_zero_([g for _, g in dropped])
        for p, g in dropped:
            p.grad = g

    def _body(self, row: dict, scale: torch.Tensor | None) -> torch.Tensor:
        """What a graph runs: forward and backward of the loss sum times ``scale`` (training), or
        without a scale, evaluation's sums (the caller has the model in eval mode, no grad)."""
        from medqa_loop.losses import eval_sums
        from medqa_loop.model import model_logits, model_loss_sum

        if scale is None:
            return eval_sums(model_logits(self.model, row), row)
        loss = model_loss_sum(self.model, row)
        (loss * scale.to(loss.dtype)).backward()
        return loss.detach()  # its autograd graph released before a capture makes its own

    def _run_eagerly_then_capture(self, graphs: dict, tokens: int, row: dict, scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.pool is None:
            self.pool, self.stream = torch.cuda.MemPool(), torch.cuda.Stream()
            # The buffers that outlive a micro-batch live outside the pool, which then holds
            # only what the graphs make and use within one.
            device = self.params[0].device
            self.grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
            self.scale = torch.ones((), device=device)
            self.seed_buffer = torch.zeros(self.seeds.count, dtype=torch.int64, device=device)
            self._bind_grads()
        # Eagerly on the stream the graphs are captured on, as PyTorch's capture recipe has it:
        # the autograd nodes that accumulate the gradients must not be the default stream's. In
        # the graphs' pool, so that its activations are the memory the capture then reuses (in
        # the default pool they would be held beside it: twice the activations reserved).
        side, current = self.stream, torch.cuda.current_stream()
        side.wait_stream(current)
        with torch.cuda.stream(side), torch.cuda.use_mem_pool(self.pool):
            output = self._body(row, scale)
        current.wait_stream(side)
        if self.off is None:
            try:
                self._capture(graphs, tokens, row, training=scale is not None)
            except Exception as e:  # a capture runs nothing: the step stands, eager from here on
                self.off = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.graphs.clear()
                self.eval_graphs.clear()
                warnings.warn(f"CUDA graph capture failed, micro-batches run eagerly from here on ({self.off})")
        return output.clone()

    def _capture(self, graphs: dict, tokens: int, row: dict, training: bool) -> None:
        inputs = {k: v.clone() for k, v in row.items() if isinstance(v, torch.Tensor)}
        graph = torch.cuda.CUDAGraph()
        with self.seeds.captured(self.seed_buffer), torch.cuda.graph(graph, pool=self.pool.id, stream=self.stream):
            output = self._body({**inputs, "longest_pair": row["longest_pair"]}, self.scale if training else None)
        graphs[tokens] = _Captured(graph, inputs, output)
        self.say(f"CUDA graph captured for {'training' if training else 'evaluation'} rows of {tokens} tokens")
