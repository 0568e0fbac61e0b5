"""The memory plan: how many decoder layers to checkpoint so that a run fits its GPU
(``model.gradient_checkpointing: auto``) and, with ``data.pack_tokens: auto``, the row size
that runs fastest within that memory (``plan``, below); chosen before the base is loaded.

Checkpointing a layer keeps only its input for backward and recomputes the rest, which costs
about half a forward of that layer; a layer that is not checkpointed keeps its activations. The
fastest plan is the one that checkpoints the fewest layers and still fits. A step's peak memory
is, measured (FIGURES), linear in the tokens of its largest micro-batch T and in the number k of
checkpointed layers out of L:

    peak(T, k) = weights + overhead + T * (full * (L - k) / L + checkpointed * k / L)

``weights`` (int8 or 16-bit base, LoRA, its gradients and AdamW's moments) is counted from the
model's config; ``overhead`` (CUDA context, cuBLAS workspaces, the allocator's slack) and the
per-token terms are fitted by least squares on FIGURES, a sweep of the 7B shapes
(``benchmarks/sweep.py``). For other shapes the per-token terms scale with the layers' widths,
an assumption the figures do not test. T comes from the data: the largest micro-batch any
window of any epoch makes (``row_stats``), a pure function of the data order.
"""

from __future__ import annotations

from dataclasses import dataclass

from medqa_loop.config import LORA_TARGETS

# (checkpointed layers of 32, tokens of the largest micro-batch, peak GB): Mistral-7B shapes
# (MistralConfig()), int8 base dequantized per matmul, bf16, LoRA r16 on all 7 projections,
# fused ops (each decoder layer as the fused nodes of kernels/decoder.py, the loss head over
# target positions), varlen attention, 16 pairs a window; `python benchmarks/sweep.py --out OUT
# --tokens 2048,4096,8192 --checkpoint-layers 24,16,8 --tokens-nogc 1024,2048,4096,8192
# --windows 2` on an H200, 2026-12-01 (BENCHMARKS.md, "Issue 17, second session").
FIGURES: list[tuple[int, int, float]] = [
    (32, 2048, 9.28), (32, 4091, 10.07), (32, 7914, 11.74),
    (24, 2048, 10.53), (24, 4091, 12.51), (24, 7914, 16.55),
    (16, 2048, 11.97), (16, 4091, 15.37), (16, 7914, 22.04),
    (8, 2048, 13.41), (8, 4091, 18.22), (8, 7914, 27.53),
    (0, 1023, 11.65), (0, 2048, 14.84), (0, 4091, 21.05), (0, 7914, 32.95),
]
FITTED_ON = {"layers": 32, "hidden_size": 4096, "intermediate_size": 14336}
MARGIN = 0.10  # of the free memory, left unplanned: fragmentation, evaluation, a longer row


class MemoryPlanError(ValueError):
    """The run does not fit the GPU even with every layer checkpointed; the message has the numbers."""


@dataclass(frozen=True)
class Plan:
    layers: int  # decoder layers to checkpoint (0: none)
    estimate_gb: float  # the peak this plan is expected to reach
    budget_gb: float  # what the plan had to fit in (free memory less the margin)
    tokens: int  # the largest micro-batch it was planned for
    reason: str  # one line: what was chosen and why


def fit(figures: list[tuple[int, int, float]], layers: int) -> tuple[float, float, float]:
    """(GB at no tokens, GB per 1k tokens with no layer checkpointed, GB per 1k tokens with all of
    them checkpointed): least squares over ``figures``."""
    import torch

    x = torch.tensor(
        [[1.0, t / 1e3 * (layers - k) / layers, t / 1e3 * k / layers] for k, t, _ in figures], dtype=torch.float64
    )
    y = torch.tensor([[gb] for _, _, gb in figures], dtype=torch.float64)
    return tuple(torch.linalg.lstsq(x, y).solution.flatten().tolist())


def weights_gb(config, lora_r: int, lora_targets: list[str], load_in_8bit: bool) -> float:
    """What the model holds whatever the tokens: the frozen base (int8 projections, 16-bit
    embeddings, lm_head and norms) and the LoRA matrices with their gradients and AdamW's two
    moments (fp32: 16 bytes a parameter)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    shapes = {  # (in, out) of each projection
        "q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }
    linear = n * sum(a * b for a, b in shapes.values())
    lora = n * sum(lora_r * (a + b) for name, (a, b) in shapes.items() if name in lora_targets)
    embeddings = 2 * config.vocab_size * h  # embed_tokens and lm_head
    base_bytes = linear * (1 if load_in_8bit else 2) + embeddings * 2
    return (base_bytes + 16 * lora) / 1e9


@dataclass(frozen=True)
class MemoryModel:
    overhead_gb: float
    full_gb_per_ktok: float  # per 1k tokens, no layer checkpointed
    checkpointed_gb_per_ktok: float  # per 1k tokens, every layer checkpointed
    weights_gb: float
    layers: int

    def estimate_gb(self, tokens: int, checkpointed: int) -> float:
        per_ktok = (
            self.full_gb_per_ktok * (self.layers - checkpointed) + self.checkpointed_gb_per_ktok * checkpointed
        ) / self.layers
        return self.weights_gb + self.overhead_gb + tokens / 1e3 * per_ktok


def memory_model(config, lora_r: int, lora_targets: list[str], load_in_8bit: bool) -> MemoryModel:
    """The fitted model (FIGURES), moved to ``config``'s shapes."""
    from types import SimpleNamespace

    from transformers import MistralConfig

    fitted = SimpleNamespace(**{**MistralConfig().to_dict(), "num_hidden_layers": FITTED_ON["layers"]})
    at_zero, full, checkpointed = fit(FIGURES, FITTED_ON["layers"])
    overhead = at_zero - weights_gb(fitted, 16, LORA_TARGETS, True)
    width = config.num_hidden_layers * (config.hidden_size + config.intermediate_size)
    scale = width / (FITTED_ON["layers"] * (FITTED_ON["hidden_size"] + FITTED_ON["intermediate_size"]))
    return MemoryModel(
        overhead, full * scale, checkpointed * scale,
        weights_gb(config, lora_r, lora_targets, load_in_8bit), config.num_hidden_layers,
    )



def choose(model: MemoryModel, tokens: int, free_gb: float, margin: float = MARGIN, limit_gb: float | None = None) -> Plan:
    """The plan that checkpoints the fewest layers and fits ``free_gb`` (or ``limit_gb``,
    ``model.memory_limit_gb``, where that is less) less the margin; raises MemoryPlanError with
    the numbers when even checkpointing every layer does not fit."""
    limited = limit_gb is not None and limit_gb < free_gb
    usable = limit_gb if limited else free_gb
    budget = usable * (1 - margin)
    for layers in range(model.layers + 1):
        estimate = model.estimate_gb(tokens, layers)
        if estimate <= budget:
            what = "no layer" if layers == 0 else f"{layers} of {model.layers} layers"
            available = f"{usable:.1f} GB by model.memory_limit_gb ({free_gb:.1f} GB free)" if limited else f"{free_gb:.1f} GB free"
            return Plan(
                layers, estimate, budget, tokens,
                f"memory plan: checkpoint {what} (estimated peak {estimate:.1f} GB for micro-batches of up to "
                f"{tokens} tokens; {available}, {budget:.1f} GB planned with a {margin:.0%} margin)",
            )
    full = model.estimate_gb(tokens, model.layers)
    available = (
        f"{usable:.1f} GB are allowed by model.memory_limit_gb ({free_gb:.1f} GB free)" if limited
        else f"{free_gb:.1f} GB are free"
    )
    raise MemoryPlanError(
        f"the run does not fit this GPU: with every one of its {model.layers} layers checkpointed, micro-batches "
        f"of up to {tokens} tokens need about {full:.1f} GB ({model.weights_gb:.1f} GB of weights), and "
        f"{available} ({budget:.1f} GB with the {margin:.0%} margin). Lower data.pack_tokens "
        "(or train.micro_batch_size with padded batches), or data.max_length"
    )


def row_stats(examples: list[dict], cfg, rows: int, world: int = 1) -> tuple[int, float, float]:
    """(tokens, padding included, of the largest micro-batch any process runs in any window of any
    epoch; micro-batches and tokens a window, on average over them) with rows of up to ``rows``
    tokens: the order is a pure function of (seed, epoch), so this is known before training."""
    from medqa_loop.batching import accumulation_windows, arrange_window, epoch_order

    t, lengths = cfg.train, [len(e["input_ids"]) for e in examples]
    largest, windows, micro_batches, tokens = 0, 0, 0, 0
    for epoch in range(t.epochs):
        order = epoch_order(len(examples), cfg.seed, epoch)
        for rank in range(world):
            for window in accumulation_windows(order, t.micro_batch_size, t.grad_accum_steps, rank, world):
                windows += 1
                for mb in arrange_window(window, lengths, cfg.data.batching, t.micro_batch_size, rows):
                    size = sum(lengths[i] for i in mb) if cfg.data.batching == "pack" else len(mb) * max(lengths[i] for i in mb)
                    largest, micro_batches, tokens = max(largest, size), micro_batches + 1, tokens + size
    return largest, micro_batches / max(windows, 1), tokens / max(windows, 1)


# -- the row size: data.pack_tokens=auto -------------------------------------------------------
#
# Smaller rows need less memory a micro-batch, so fewer layers checkpointed (less recompute),
# but cost more micro-batches a window: eagerly ~0.19 s of CPU each (the launches), as CUDA
# graphs (rows of up to kernels.graphs.AUTO_MAX_ROW tokens) ~0.02 s of GPU each (the int8
# weights dequantized again, smaller matmuls). Which wins depends on the memory: on an H200 one
# row a window with nothing checkpointed; within 16 GB rows of 2,048 tokens as graphs (a 16k row
# must checkpoint 30 of 32 layers there).

ROW_CHOICES = (2048, 3072, 4096, 8192, 16384)  # what auto chooses among (those >= data.max_length)
DEFAULT_ROWS = 16384  # auto where there is nothing to plan for (the CPU, padded batches): a window a row


@dataclass(frozen=True)
class SpeedModel:
    """Seconds an optimizer window takes, by its tokens, micro-batches, checkpointed layers and
    whether they replay as CUDA graphs. The GPU's part is linear in the tokens (more with
    recompute) and in the micro-batches. An eager micro-batch also costs the CPU its launches
    (more with recompute: checkpointed layers launch their forward twice); CPU and GPU overlap, so
    the slower of the two sets the pace, with a little of the other showing (a 4-norm of the two).
    Fitted on the H200 figures of the 7B shapes (BENCHMARKS.md, "Issue 17, fourth session":
    graphs_sweep.jsonl, results.jsonl); the plan uses only the order in which it ranks plans."""

    gpu_s_per_ktok: float = 0.0602  # no layer checkpointed
    recompute: float = 0.42  # the GPU part's increase with every layer checkpointed
    gpu_s_per_micro_batch: float = 0.0214
    cpu_s_per_eager_micro_batch: float = 0.19  # no layer checkpointed
    cpu_recompute: float = 0.67  # its increase with every layer checkpointed

    def window_s(self, tokens: float, micro_batches: float, checkpointed: int, layers: int, graphs: bool) -> float:
        share = checkpointed / layers
        gpu = tokens / 1e3 * self.gpu_s_per_ktok * (1 + self.recompute * share) + micro_batches * self.gpu_s_per_micro_batch
        if graphs:
            return gpu
        cpu = micro_batches * self.cpu_s_per_eager_micro_batch * (1 + self.cpu_recompute * share)
        return (gpu**4 + cpu**4) ** 0.25


SPEED = SpeedModel()


@dataclass(frozen=True)
class RunPlan:
    """What ``plan`` decided, before the base is loaded."""

    rows: int  # data.pack_tokens as the run uses it: the longest packed row
    graphs: bool  # model.cuda_graphs as the run uses it
    layers: int  # decoder layers to checkpoint
    record: dict  # the figures, for metrics.jsonl's first line
    line: str  # the start-up line


def _forced_layers(setting, n_layers: int) -> int | None:
    """model.gradient_checkpointing as a number of layers; None for auto."""
    if setting == "auto":
        return None
    if isinstance(setting, bool):
        return n_layers if setting else 0
    return min(setting, n_layers)


def plan(cfg, model_config, examples: list[dict], device, world: int = 1) -> RunPlan:
    """The rows, CUDA graphs and checkpointed layers of this run, from its config, data and GPU.

    ``model.gradient_checkpointing``: true = every layer, false = none, N = the first N, "auto" =
    ``choose`` on a GPU (its free memory now, before the base is loaded, or
    ``model.memory_limit_gb`` where that is less) for the largest micro-batch (as its CUDA graph
    pads it), and every layer on the CPU, where memory is not the limit. ``data.pack_tokens``:
    a number is the rows; "auto" = of ROW_CHOICES, the one whose plan SPEED ranks fastest (on a
    GPU, packing), else DEFAULT_ROWS. ``model.cuda_graphs`` follows the rows (kernels.graphs.use_graphs).
    Raises MemoryPlanError where no plan fits."""
    import torch

    from medqa_loop.kernels.graphs import padded_tokens, use_graphs

    n_layers, setting = model_config.num_hidden_layers, cfg.model.gradient_checkpointing
    forced = _forced_layers(setting, n_layers)
    on_gpu = torch.device(device).type == "cuda"
    if cfg.data.pack_tokens != "auto":
        choices = [cfg.data.pack_tokens]
    elif on_gpu and cfg.data.batching == "pack":  # a row must hold the longest pair
        choices = [r for r in ROW_CHOICES if r >= cfg.data.max_length] or [cfg.data.max_length]
    else:
        choices = [DEFAULT_ROWS]
    if not on_gpu:
        rows, layers = choices[0], n_layers if forced is None else forced
        why = "on the CPU" if forced is None else "model.gradient_checkpointing"
        what = f"all {n_layers} layers" if forced is None else f"{layers} of {n_layers} layers"
        return RunPlan(rows, use_graphs(cfg, device, world, rows), layers, {"checkpoint_layers": layers, "rows": rows},
                       f"memory plan: checkpoint {what} ({why}), rows of up to {rows} tokens")
    model = memory_model(model_config, cfg.lora.r, cfg.lora.target_modules, cfg.model.load_in_8bit)
    free_gb, limit = torch.cuda.mem_get_info(device)[0] / 1e9, cfg.model.memory_limit_gb
    candidates, refused = [], None
    for rows in sorted(choices, reverse=True):  # on a tie the larger rows: less padding, fewer micro-batches
        graphs = use_graphs(cfg, device, world, rows)
        largest, micro_batches, window_tokens = row_stats(examples, cfg, rows, world)
        tokens = padded_tokens(largest) if graphs else largest
        if forced is None:
            try:
                chosen = choose(model, tokens, free_gb, limit_gb=limit)
            except MemoryPlanError as e:
                refused = e  # the smallest rows' numbers, once every size is refused
                continue
            layers, reason = chosen.layers, chosen.reason
        else:
            layers = forced
            reason = (f"memory plan: checkpoint {forced} of {n_layers} layers (model.gradient_checkpointing); estimated "
                      f"peak {model.estimate_gb(tokens, forced):.1f} GB for micro-batches of up to {tokens} tokens, "
                      f"{free_gb:.1f} GB free")
        seconds = SPEED.window_s(window_tokens, micro_batches, layers, n_layers, graphs)
        candidates.append((seconds, rows, graphs, layers, tokens, reason))
    if not candidates:
        if len(choices) > 1:  # auto: every size refused, the smallest's numbers
            raise MemoryPlanError(f"{refused} (data.pack_tokens=auto tried rows of {min(choices)} to {max(choices)} tokens)")
        raise refused
    seconds, rows, graphs, layers, tokens, reason = min(candidates, key=lambda c: c[0])
    if cfg.data.pack_tokens == "auto":
        others = ", ".join(f"{r}: {s:.2f}" for s, r, *_ in sorted(candidates, key=lambda c: -c[1]) if r != rows)
        reason += (f"; rows of up to {rows} tokens{' as CUDA graphs' if graphs else ''} (data.pack_tokens=auto: "
                   f"~{seconds:.2f} s a window estimated{', against ' + others if others else ''})")
    record = {
        "checkpoint_layers": layers, "rows": rows, "memory_estimate_gb": round(model.estimate_gb(tokens, layers), 2),
        "memory_free_gb": round(free_gb, 2), "memory_limit_gb": limit, "largest_micro_batch_tokens": tokens,
        "window_s_estimate": round(seconds, 3),
    }
    return RunPlan(rows, graphs, layers, record, reason)
