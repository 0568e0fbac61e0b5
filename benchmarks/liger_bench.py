"""GPU time of the fast path's kernels against Liger-Kernel's (PyPI liger-kernel 0.8.5) and the
eager ops they replace, at the shapes of Mistral-7B over a 16-pair window (~7.5k tokens),
forward alone and forward + backward.

  python benchmarks/liger_bench.py [--tokens 7500] [--out benchmarks/liger_results.jsonl] [--head-only]
  python benchmarks/liger_bench.py --cpu-check

What is compared (T tokens, bf16; gradients for the activations only: LoRA freezes the norm
weights and lm_head):

* rmsnorm [T, 4096], eps 1e-5: ``RMSNormFn`` (ours), ``LigerRMSNormFunction`` (casting
  "llama", in_place as its LigerRMSNorm module), transformers' MistralRMSNorm (eager).
* silu_mul [T, 14336]: ``SiluMul`` (ours), ``LigerSiLUMulFunction``, F.silu(gate) * up (eager).
* rotary: q [1, 32, T, 128] and k [1, 8, T, 128] as [B, H, T, D] views of the projections'
  [B, T, H, D] memory (their output gradients too, as attention's backward hands them over),
  cos/sin [1, T, 128] from MistralRotaryEmbedding at positions 0..T-1: ``RotaryFn`` (ours),
  ``LigerRopeFunction`` (whether it rotated that memory in place, needing no copy, is the
  row's ``in_place``), transformers' apply_rotary_pos_emb (eager).
* loss_head: hidden [T, 4096], lm_head weight [32000, 4096] (frozen), labels of 16 pairs whose
  first 30% (the prompt) is -100, weight 1.0 on every target. Today's path (``hidden @ W.T``,
  then ``medqa_loop.losses.weighted_loss_sum``) against Liger's fused linear cross-entropy
  (reduction sum, ignore_index -100): on every row with the labels shifted as its
  LigerForCausalLMLoss does, on the rows whose next label is a target, and with reduction
  "none" times the per-token weights (what weights other than 1.0 would need).

Each row: fwd_ms and fwd_bwd_ms (``gpu_ms`` of kernel_bench.py: median of 20 calls timed by
CUDA events after 3 warm-up calls; the forward records the autograd graph as in training; the
backward is ``torch.autograd.grad`` with fixed output gradients), peak_mb (the rise of
torch.cuda.max_memory_allocated over one forward + backward, the gradients it returns
included), and its agreement with the op's first row: max_abs_diff_out and max_abs_diff_grad
(over all outputs and input gradients) against the eager op; for the loss head ``loss``, its
relative difference against today's path and against an fp32 reference (fp32 logits,
F.cross_entropy), and max_abs_diff_grad of hidden's gradient against today's path. The first
row names the versions of torch, triton, liger-kernel and transformers. Each comparison runs
in its own try: a failure is its row's ``error`` (and ``where``, the last frames), and the
next one runs; cases left after --budget-s are skipped. Rows are printed and appended to
--out as they are measured, with the command, GPU, date and code_digest; the script exits 0
whatever failed.

``--cpu-check`` proves the loss head's indexing (the prompt mask, the shift, the target rows
the fused losses take, Liger's causal-LM shift) on the CPU with tiny fp32 shapes against a
plain per-position cross-entropy; no timing, no Liger. It exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import itertools
import json
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F

# benchmarks/ is on sys.path when this file runs as a script
from kernel_bench import gpu_ms, write_rows

HIDDEN, INTERMEDIATE, VOCAB = 4096, 14336, 32000  # Mistral-7B
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
EPS = 1e-5  # Mistral-7B's rms_norm_eps
PAIRS, PROMPT_SHARE = 16, 0.3  # a window's pairs; the share of each pair that is prompt
BF16 = torch.bfloat16
DEVICE = "cuda"


@dataclasses.dataclass
class Case:
    """One implementation of one op, on its own copy of the inputs (Liger's kernels write
    into their inputs and output gradients)."""

    run: Callable[[], tuple[torch.Tensor, ...]]  # the forward: differentiable outputs
    inputs: list[torch.Tensor]  # what the gradients are taken for
    grad_outputs: list[torch.Tensor] | None  # None for a scalar loss
    note: str = ""
    extra: dict = dataclasses.field(default_factory=dict)  # more fields for the row


Results = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]


def forward_backward(case: Case) -> Results:
    outputs = case.run()
    return outputs, torch.autograd.grad(outputs, case.inputs, case.grad_outputs)


def peak_mb(case: Case) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = forward_backward(case)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return round(peak / 2**20, 1)


def max_abs_diff(got, want) -> float:
    pairs = zip(got, want, strict=True)
    return max((g.float() - w.float()).abs().max().item() for g, w in pairs)


def guarded(fn: Callable[[], object]) -> dict:
    """{} if ``fn`` ran, else the exception's text and the last frames it passed through:
    enough to fix it from the row alone (the GPU run is not repeated)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any failure is a row, and the run goes on
        frames = traceback.extract_tb(e.__traceback__)[-3:]
        where = " <- ".join(
            f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
            for f in reversed(frames)
        )
        return {"error": f"{type(e).__name__}: {e}"[:2000], "where": where}
    return {}


def release() -> None:
    """Free what a case left behind, so the next one starts from the same memory (a context
    broken by a failure makes this fail too: the next cases then record their own errors)."""
    guarded(lambda: (torch.cuda.synchronize(), torch.cuda.empty_cache()))


class Rows:
    """Prints each row as it is measured and appends it to ``out`` at once, so a run cut short
    keeps what it measured."""

    def __init__(self, out: str | None, tokens: int):
        self.out, self.tokens = out, tokens

    def emit(self, row: dict) -> None:
        row = {"tokens": self.tokens, **row}
        print(json.dumps(row), flush=True)
        if self.out and (problem := guarded(lambda: write_rows(self.out, [row]))):
            print(f"could not append to {self.out}: {problem}", file=sys.stderr)


class Bench:
    def __init__(self, rows: Rows, deadline: float):
        self.rows, self.deadline = rows, deadline
        self.reference: Results | None = None

    def measure(self, op: str, impl: str, build: Callable[[], Case], reference=False):
        """Time one implementation and compare it with the op's reference (the last case
        measured with ``reference=True``, whose outputs and gradients are kept)."""
        row = {"op": op, "impl": impl}
        if reference:
            self.reference = None  # a failed reference leaves the others uncompared
        if time.monotonic() > self.deadline:
            row["error"] = "skipped: the run's --budget-s is spent"
        else:
            row.update(guarded(lambda: self._measure(row, build(), reference)))
        self.rows.emit(row)
        release()

    def _measure(self, row: dict, case: Case, reference: bool) -> None:
        row.update(case.extra)
        if case.note:
            row["note"] = case.note
        # Agreement first, on pristine inputs: the timed calls overwrite Liger's.
        outputs, grads = forward_backward(case)
        results = (
            tuple(o.detach().clone() for o in outputs),
            tuple(g.clone() for g in grads),
        )
        del outputs, grads
        if reference:
            self.reference = results
        elif self.reference is not None:
            row["max_abs_diff_out"] = max_abs_diff(results[0], self.reference[0])
            row["max_abs_diff_grad"] = max_abs_diff(results[1], self.reference[1])
        del results
        row["fwd_ms"] = round(gpu_ms(case.run), 4)
        row["fwd_bwd_ms"] = round(gpu_ms(lambda: forward_backward(case)), 4)
        row["peak_mb"] = peak_mb(case)


def rand(shape, seed: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
    """The same values for the same seed: each implementation gets its own equal copy."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    t = (torch.randn(shape, device=DEVICE, generator=gen) * scale).to(BF16)
    return t.requires_grad_(grad)


def versions() -> dict:
    found = {"torch": torch.__version__}
    for package in ("triton", "liger-kernel", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def load_liger(rows: Rows):
    """liger_kernel.ops (where Liger's model patches take their Function classes from), or
    None after a row saying why not."""
    found = {}

    def load():
        found["ops"] = importlib.import_module("liger_kernel.ops")

    problem = guarded(load)
    note = "the Liger rows are skipped" if problem else "liger_kernel.ops imported"
    rows.emit({"op": "setup", **versions(), "note": note, **problem})
    return found.get("ops")


def liger_function(liger, name: str):
    """The Function class and a note naming the module it came from (liger_kernel.ops
    swaps in another backend's class where one is selected for the device)."""
    cls = getattr(liger, name)
    return cls, f"{name} from {cls.__module__}"


# -- the elementwise ops -------------------------------------------------------------------------


def rmsnorm_cases(t: int, liger) -> list[tuple[str, Callable[[], Case]]]:
    def inputs():
        x = rand((t, HIDDEN), 1, grad=True)
        weight = rand((HIDDEN,), 2, scale=0.1) + 1  # near 1, as trained norms are
        return x, weight, [rand((t, HIDDEN), 3)]

    def eager():
        from transformers.models.mistral.modeling_mistral import MistralRMSNorm

        x, weight, g = inputs()
        norm = MistralRMSNorm(HIDDEN, eps=EPS).to(DEVICE, BF16).requires_grad_(False)
        norm.weight.copy_(weight)
        return Case(lambda: (norm(x),), [x], g, "transformers MistralRMSNorm")

    def ours():
        from medqa_loop.kernels.autograd import RMSNormFn

        x, weight, g = inputs()
        return Case(lambda: (RMSNormFn.apply(x, weight, EPS),), [x], g)

    def liger_rms():
        fn, name = liger_function(liger, "LigerRMSNormFunction")
        x, weight, g = inputs()
        # offset, casting_mode, in_place, row_mode as LigerRMSNorm passes them for Llama/Mistral
        run = lambda: (fn.apply(x, weight, EPS, 0.0, "llama", True, None),)
        return Case(run, [x], g, f"{name}; in_place: its backward writes dX into dY")

    return [("eager", eager), ("ours", ours), ("liger", liger_rms)]


def silu_mul_cases(t: int, liger) -> list[tuple[str, Callable[[], Case]]]:
    def inputs():
        gate, up = (
            rand((t, INTERMEDIATE), 4, grad=True),
            rand((t, INTERMEDIATE), 5, grad=True),
        )
        return gate, up, [rand((t, INTERMEDIATE), 6)]

    def eager():
        gate, up, g = inputs()
        return Case(lambda: (F.silu(gate) * up,), [gate, up], g, "F.silu(gate) * up")

    def ours():
        from medqa_loop.kernels.autograd import SiluMul

        gate, up, g = inputs()
        return Case(lambda: (SiluMul.apply(gate, up),), [gate, up], g)

    def liger_swiglu():
        fn, name = liger_function(liger, "LigerSiLUMulFunction")
        gate, up, g = inputs()
        note = f"{name}; its backward writes the gradients into the saved gate and up"
        return Case(lambda: (fn.apply(gate, up),), [gate, up], g, note)

    return [("eager", eager), ("ours", ours), ("liger", liger_swiglu)]


def rotary_cases(t: int, liger) -> list[tuple[str, Callable[[], Case]]]:
    def bthd(
        heads: int, seed: int, grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the [B, T, H, D] memory, its [B, H, T, D] view): the projections' layout."""
        memory = rand((1, t, heads, HEAD_DIM), seed, grad=grad)
        return memory, memory.transpose(1, 2)

    def inputs():
        from transformers import MistralConfig
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

        (q_mem, q), (k_mem, k) = (
            bthd(Q_HEADS, 7, grad=True),
            bthd(KV_HEADS, 8, grad=True),
        )
        rope = MistralRotaryEmbedding(MistralConfig(head_dim=HEAD_DIM)).to(DEVICE)
        cos, sin = rope(q, torch.arange(t, device=DEVICE)[None])  # [1, T, 128] bf16
        grads = [bthd(Q_HEADS, 9)[1], bthd(KV_HEADS, 10)[1]]
        return q_mem, k_mem, q, k, cos, sin, grads

    def eager():
        from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

        q_mem, k_mem, q, k, cos, sin, g = inputs()
        run = lambda: apply_rotary_pos_emb(q, k, cos, sin)
        return Case(run, [q_mem, k_mem], g, "transformers apply_rotary_pos_emb")

    def ours():
        from medqa_loop.kernels import ops
        from medqa_loop.kernels.autograd import RotaryFn

        q_mem, k_mem, q, k, cos, sin, g = inputs()
        covered = ops.rotary_covers(q, k, cos, sin)
        note = (
            ""
            if covered
            else "rotary_covers is False: the model would run transformers' instead"
        )
        run = lambda: RotaryFn.apply(q, k, cos, sin)
        return Case(run, [q_mem, k_mem], g, note, {"rotary_covers": covered})

    def liger_rope():
        fn, name = liger_function(liger, "LigerRopeFunction")
        # Its kernel transposes back to [B, T, H, D] and calls .contiguous(): no copy for
        # these views, and it rotates them in place. Whether it did is measured (on a copy:
        # the case's inputs stay unrotated for the agreement check).
        probe_mem, _, probe_q, probe_k, cos, sin, _ = inputs()
        in_place = (
            fn.apply(probe_q, probe_k, cos, sin)[0].data_ptr() == probe_mem.data_ptr()
        )
        del probe_mem, probe_q, probe_k
        note = f"{name}; " + (
            "rotates q and k in place in their [B,T,H,D] memory (no .contiguous() copy)"
            if in_place
            else "copied q and k (it did not write into the projections' memory)"
        )
        q_mem, k_mem, q, k, cos, sin, g = inputs()
        run = lambda: fn.apply(q, k, cos, sin)
        return Case(run, [q_mem, k_mem], g, note, {"in_place": in_place})

    return [("eager", eager), ("ours", ours), ("liger", liger_rope)]


# -- the loss head -------------------------------------------------------------------------------


def window_labels(
    tokens: int, vocab: int, gen: torch.Generator, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, weights) of a packed window of PAIRS pairs, unshifted as the collator makes them:
    random token ids, the first PROMPT_SHARE of each pair IGNORE_INDEX (its prompt), weight
    1.0 on every other label and 0.0 on the prompt."""
    from medqa_loop.losses import IGNORE_INDEX

    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    starts = [round(i * tokens / PAIRS) for i in range(PAIRS + 1)]
    for start, end in itertools.pairwise(starts):
        labels[start : start + round(PROMPT_SHARE * (end - start))] = IGNORE_INDEX
    return labels, (labels != IGNORE_INDEX).float()


def target_rows(
    hidden, labels, weights
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of ``hidden`` whose next label is a target, with those targets and their
    weights: weighted_loss_sum's shift done outside, as a fused linear loss takes it."""
    from medqa_loop.losses import IGNORE_INDEX

    keep = labels[1:] != IGNORE_INDEX
    return hidden[:-1][keep], labels[1:][keep], weights[1:][keep]


def causal_lm_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's next label, the last one ignored: LigerForCausalLMLoss's shift (it
    then takes every row of hidden)."""
    from medqa_loop.losses import IGNORE_INDEX

    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[1:]


def todays_loss(hidden, weight, labels, weights) -> torch.Tensor:
    from medqa_loop.losses import weighted_loss_sum

    return weighted_loss_sum((hidden @ weight.T)[None], labels[None], weights[None])


def fp32_loss(hidden, weight, labels, weights) -> float:
    """The loss head in fp32 (hidden and W as given in bf16), by plain F.cross_entropy."""
    with torch.no_grad():
        rows, targets, w = target_rows(hidden.float(), labels, weights)
        return (
            F.cross_entropy(rows @ weight.float().T, targets, reduction="none") @ w
        ).item()


def loss_head(bench: Bench, t: int, liger) -> None:
    """Today's loss head, then each fused variant against it (max_abs_diff_out is then the
    loss's absolute difference, max_abs_diff_grad hidden's gradient's)."""
    from medqa_loop import losses

    op = f"loss_head [{t},{HIDDEN}] x [{VOCAB},{HIDDEN}]"
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    weight = rand((VOCAB, HIDDEN), 12, scale=HIDDEN**-0.5)  # logits of std ~1
    labels, weights = window_labels(t, VOCAB, gen, DEVICE)
    exact = fp32_loss(rand((t, HIDDEN), 13), weight, labels, weights)
    targets = int(weights[1:].count_nonzero())
    bench.rows.emit(
        {"op": op, "impl": "fp32 reference", "loss": exact, "targets": targets}
    )
    today: list[float] = []

    def measure(impl: str, loss_of: Callable, note: str, reference=False) -> None:
        def build():
            hidden = rand((t, HIDDEN), 13, grad=True)  # the same values for each
            loss = loss_of(hidden).item()
            extra = {"loss": loss, "rel_diff_loss_vs_fp32": abs(loss - exact) / exact}
            if reference:
                today.append(loss)
            elif today:
                extra["rel_diff_loss_vs_today"] = abs(loss - today[0]) / today[0]
            return Case(lambda: (loss_of(hidden),), [hidden], None, note, extra)

        bench.measure(op, impl, build, reference)

    measure(
        "today",
        lambda h: todays_loss(h, weight, labels, weights),
        "logits = hidden @ W.T, then medqa_loop.losses.weighted_loss_sum",
        reference=True,
    )
    def ours(h):
        from medqa_loop.kernels import ops

        rows, targets, w = target_rows(h, labels, weights)
        return ops.linear_cross_entropy_sum(rows, weight, targets, w)

    measure(
        "ours: LinearCrossEntropySum, target rows, weights",
        ours,
        "medqa_loop.kernels.autograd.LinearCrossEntropySum (the training head): chunks of 1024 rows, "
        "the Triton cross-entropy writing each row's weighted gradient in place; hidden's gradient "
        "is computed in its forward (fwd_ms includes it); no host sync",
    )
    flce = getattr(liger, "LigerFusedLinearCrossEntropyFunction", None)
    if liger is not None and flce is None:
        error = "liger_kernel.ops has no LigerFusedLinearCrossEntropyFunction"
        bench.rows.emit({"op": op, "impl": "liger", "error": error})
    elif flce is not None:
        name = f"{flce.__name__} from {flce.__module__}"
        in_fwd = "; it computes hidden's gradient in its forward (fwd_ms includes it)"

        def liger_sum(rows, targets, reduction="sum"):
            # (_input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
            # label_smoothing, reduction): positional, as autograd.Function.apply takes them
            args = (None, None, losses.IGNORE_INDEX, 0.0, 0.0, reduction)
            return flce.apply(rows, weight, targets, *args)[0]

        def liger_weighted(h):
            rows, targets, w = target_rows(h, labels, weights)
            return liger_sum(rows, targets, "none") @ w

        shifted = causal_lm_targets(labels)
        measure(
            "liger FLCE, every row",
            lambda h: liger_sum(h, shifted),
            f"{name} on all of hidden, labels shifted and padded as LigerForCausalLMLoss "
            f"does; reduction sum, unweighted (the same: every weight is 1.0){in_fwd}",
        )
        measure(
            "liger FLCE, target rows",
            lambda h: liger_sum(*target_rows(h, labels, weights)[:2]),
            f"{name} on the rows whose next label is a target; reduction sum{in_fwd}",
        )
        measure(
            "liger FLCE, target rows, reduction none x weights",
            liger_weighted,
            f"{name}: per-token losses times the weights, what weights other than 1.0 "
            "need; its backward recomputes the logits",
        )


# -- the CPU check of the loss head's indexing ---------------------------------------------------


def cpu_check() -> int:
    """The loss head's inputs as the GPU run builds them (tiny, fp32, CPU): today's path, the
    target rows' cross-entropy (what the fused losses get) and, unweighted, Liger's causal-LM
    shift over every row, each against a per-position loop; loss and hidden's gradient."""
    from medqa_loop import losses

    t, hidden_size, vocab = 96, 16, 40
    gen = torch.Generator().manual_seed(0)
    labels, ones = window_labels(t, vocab, gen, "cpu")
    problems = []
    # 96 tokens: 16 pairs of 6, whose first round(0.3 * 6) = 2 labels are the prompt
    prompt = labels.view(PAIRS, -1) == losses.IGNORE_INDEX
    if not (prompt[:, :2].all() and not prompt[:, 2:].any()):
        problems.append(f"prompt mask: {prompt.int().tolist()}")
    random_weights = torch.rand(t, generator=gen) * (labels != losses.IGNORE_INDEX)
    weight = torch.randn(vocab, hidden_size, generator=gen)
    # CE_CHUNK 7: several cross-entropy chunks, as 7.5k tokens make
    settings = itertools.product([("1.0", ones), ("random", random_weights)], [None, 7])
    for (weights_name, weights), chunk in settings:
        hidden = torch.randn(t, hidden_size, generator=gen, requires_grad=True)
        want = sum(
            weights[i + 1] * F.cross_entropy(hidden[i] @ weight.T, labels[i + 1])
            for i in range(t - 1)
            if labels[i + 1] != losses.IGNORE_INDEX
        )
        (want_grad,) = torch.autograd.grad(want, hidden)
        saved_chunk = losses.CE_CHUNK
        losses.CE_CHUNK = chunk or saved_chunk
        try:
            got = {"today": todays_loss(hidden, weight, labels, weights)}
        finally:
            losses.CE_CHUNK = saved_chunk
        rows, targets, w = target_rows(hidden, labels, weights)
        got["target rows"] = (
            F.cross_entropy(rows @ weight.T, targets, reduction="none") @ w
        )
        if weights is ones:
            logits = hidden @ weight.T
            got["every row, causal-LM shift"] = F.cross_entropy(
                logits, causal_lm_targets(labels), reduction="sum"
            )
        for path, loss in got.items():
            (grad,) = torch.autograd.grad(loss, hidden)
            rel = abs(loss.item() - want.item()) / abs(want.item())
            grad_diff = (grad - want_grad).abs().max().item()
            setting = f"{path}, weights {weights_name}, CE_CHUNK {chunk or saved_chunk}"
            result = {"rel_diff_loss": rel, "max_abs_diff_grad": grad_diff}
            print(json.dumps({"check": setting, **result}), flush=True)
            if rel > 1e-5 or grad_diff > 1e-5:
                problems.append(f"{setting}: {result}")
    print("cpu check: " + ("; ".join(problems) or "ok"), flush=True)
    return 1 if problems else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=7500)
    p.add_argument("--out")
    p.add_argument(
        "--budget-s",
        type=float,
        default=480,
        help="skip the cases left after this long",
    )
    p.add_argument(
        "--cpu-check", action="store_true", help="the loss head's indexing, on the CPU"
    )
    p.add_argument("--head-only", action="store_true", help="only the loss head's comparison")
    a = p.parse_args()
    if a.cpu_check:
        sys.exit(cpu_check())
    rows, t = Rows(a.out, a.tokens), a.tokens
    if not torch.cuda.is_available():
        print(json.dumps({"op": "setup", "error": "CUDA is not available"}), flush=True)
        return
    bench = Bench(rows, time.monotonic() + a.budget_s)
    liger = load_liger(rows)
    for op, cases in () if a.head_only else (
        (f"rmsnorm [{t},{HIDDEN}]", rmsnorm_cases),
        (f"silu_mul [{t},{INTERMEDIATE}]", silu_mul_cases),
        (
            f"rotary q [1,{Q_HEADS},{t},{HEAD_DIM}] k [1,{KV_HEADS},{t},{HEAD_DIM}]",
            rotary_cases,
        ),
    ):
        for impl, build in cases(t, liger):
            if impl == "liger" and liger is None:
                continue
            bench.measure(op, impl, build, reference=impl == "eager")
    if problem := guarded(lambda: loss_head(bench, t, liger)):
        rows.emit({"op": "loss_head", **problem})


if __name__ == "__main__":
    main()
