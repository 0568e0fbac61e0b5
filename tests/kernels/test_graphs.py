"""CUDA graphs for the training micro-batch (medqa_loop.kernels.graphs) and the per-forward dropout
seeds they rely on (medqa_loop.kernels.seeds): a padded row is the row, the seeds are the eager
draws, the config says where graphs cannot run before any model loads; on CUDA, a replayed
window gives the eager window's loss and gradients."""

import pytest
import torch

from conftest import loss_and_grads, rel, set_lora
from medqa_loop.batching import collate, to_device, window_batches
from medqa_loop.config import ConfigError
from medqa_loop.kernels.graphs import MicroBatchGraphs, padded_row, padded_tokens, row_slots
from medqa_loop.kernels.patch import dropout_seeds
from medqa_loop.losses import eval_sums
from medqa_loop.model import model_logits, model_loss_sum
from medqa_loop.train import prepare_run


def build(tiny_cfg, tmp_path, *overrides):
    parts = prepare_run(tiny_cfg(f"output_dir={tmp_path / 'run'}", *overrides))
    parts.model.train()
    set_lora(parts.model)
    return parts




def test_padded_row_layout():
    batch = collate([{"input_ids": [5] * n, "labels": [7] * n, "loss_weights": [1.0] * n, "row": i}
                     for i, n in enumerate((3, 4))], pad_id=0, packed=True)
    row = padded_row(batch, tokens=16, slots=6, pair_tokens=4, pad_id=0)
    assert row["input_ids"].tolist() == [[5] * 7 + [0] * 9]
    # the padding is pairs of at most 4 tokens, positions restarting; then empty pairs
    assert row["cu_seq_lens"].tolist() == [0, 3, 7, 11, 15, 16, 16]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0]]
    k = batch["target_positions"].numel()
    assert row["target_positions"][:k].tolist() == batch["target_positions"].tolist()
    assert row["target_weights"].shape == (16,) and row["target_weights"][k:].abs().sum() == 0
    assert row["targets"].dtype == torch.long and row["longest_pair"] == 4
    with pytest.raises(ValueError, match="does not fit a graph of 16 tokens and 4 pairs"):
        padded_row(batch, tokens=16, slots=4, pair_tokens=4, pad_id=0)


def test_row_slots_and_padded_sizes():
    assert row_slots([5, 3, 9, 2], tokens=10, pair_tokens=4) == 3 + 3  # 2+3+5 fit; 10 tokens of padding at most
    assert [padded_tokens(n) for n in (1, 512, 513, 2000)] == [512, 512, 1024, 2048]


def padded_copy(parts, examples: list[dict]) -> tuple[dict, dict]:
    """(a packed row of the first 3 ``examples``, the same row padded with a whole padding pair
    more than its graph size needs), on the CPU."""
    batch = to_device(collate(examples[:3], pad_id=parts.tokenizer.pad_token_id, packed=True), "cpu")
    lengths = [len(e["input_ids"]) for e in examples]
    tokens = padded_tokens(batch["input_ids"].size(1)) + 512
    return batch, padded_row(batch, tokens, row_slots(lengths, tokens, max(lengths)), max(lengths), parts.tokenizer.pad_token_id)


def test_a_padded_row_gives_the_rows_loss_and_gradients(tiny_cfg, tmp_path):
    """The padding pairs attend only to themselves and have no targets: the same loss and LoRA
    gradients (fp32, CPU, with dropout: the seeds are the same draws)."""
    parts = build(tiny_cfg, tmp_path, "lora.dropout=0.2")
    batch, row = padded_copy(parts, parts.train_examples)
    want_loss, want = loss_and_grads(parts.model, batch)
    got_loss, got = loss_and_grads(parts.model, row)
    assert rel(got_loss, want_loss) < 1e-6
    for name in want:
        assert want[name].norm() > 0 and rel(got[name], want[name]) < 1e-5, name


def test_a_padded_row_gives_the_rows_eval_sums(tiny_cfg, tmp_path):
    """Evaluation through a padded row (what an evaluation graph runs): the same loss sum,
    weight and accuracy counts as the row (fp32, CPU)."""
    parts = build(tiny_cfg, tmp_path)
    parts.model.eval()
    batch, row = padded_copy(parts, parts.val_examples)
    with torch.no_grad():
        want, got = eval_sums(model_logits(parts.model, batch), batch), eval_sums(model_logits(parts.model, row), row)
    assert want[1] > 0 and want[3] == batch["targets"].numel()
    assert rel(got, want) < 1e-6, (got, want)


def test_a_training_forward_draws_one_seed_per_lora_linear(tiny_cfg, tmp_path):
    """All of a forward's seeds in one draw from the global generator: the values the layers drew
    one at a time before, so seeded runs keep their masks; none in evaluation."""
    parts = build(tiny_cfg, tmp_path, "lora.dropout=0.1")
    seeds = dropout_seeds(parts.model)
    assert seeds.count == 14  # 2 layers x 7 projections
    batch = to_device(collate(parts.train_examples[:2], pad_id=parts.tokenizer.pad_token_id, packed=True), "cpu")
    torch.manual_seed(3)
    model_loss_sum(parts.model, batch)
    after = torch.randint(2**62, ())
    torch.manual_seed(3)
    one_at_a_time = [torch.randint(2**62, ()) for _ in range(15)]
    assert seeds.current.tolist() == [int(s) for s in one_at_a_time[:14]] and after == one_at_a_time[14]
    parts.model.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        parts.model(input_ids=batch["input_ids"])
    assert torch.equal(torch.get_rng_state(), state)


def test_cuda_graphs_true_where_they_cannot_run_fails_before_the_model_loads(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="model.cuda_graphs' is true, but data.batching=pad"):
        tiny_cfg("model.cuda_graphs=true", "data.batching=pad")
    with pytest.raises(ConfigError, match="debug.enabled=true"):
        tiny_cfg("model.cuda_graphs=true", "model.dtype=bfloat16", "debug.enabled=true")
    with pytest.raises(ConfigError, match="must be auto, true or false"):
        tiny_cfg("model.cuda_graphs=sometimes")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="the run is on cpu, not CUDA"):
            prepare_run(tiny_cfg("model.cuda_graphs=true", "model.dtype=bfloat16"))
        assert not (tmp_path / "run" / "base").exists()  # no model was built or loaded
    with pytest.raises(ConfigError, match="model.dtype=float32"):
        tiny_cfg("model.cuda_graphs=true")  # the tiny preset's fp32: no FlashAttention
    auto = prepare_run(tiny_cfg(f"output_dir={tmp_path / 'auto'}", "model.dtype=bfloat16", "data.pack_tokens=2048"))
    assert (auto.graphs is not None) == torch.cuda.is_available()
    assert auto.data_stats["cuda_graphs"] == torch.cuda.is_available()
    large = prepare_run(tiny_cfg(f"output_dir={tmp_path / 'large'}", "model.dtype=bfloat16", "data.pack_tokens=8192"))
    assert large.graphs is None  # auto: rows this large run eagerly


@pytest.mark.cuda
@pytest.mark.parametrize("gc", [False, True], ids=["no-checkpointing", "checkpointed"])
def test_cuda_replayed_windows_equal_eager_windows(tiny_cfg, tmp_path, gc):
    """Two windows of packed rows of two padded sizes, with dropout: the replays' losses and
    accumulated LoRA gradients are those of the same padded rows run eagerly (bf16; FlashAttention's
    backward adds in another order each run), and the second window finds its .grad dropped, as
    the optimizer step leaves it, and starts from zero."""
    overrides = ["model.dtype=bfloat16", "lora.dropout=0.1", f"model.gradient_checkpointing={gc}",
                 "data.pack_tokens=600", "train.micro_batch_size=1"]
    parts = build(tiny_cfg, tmp_path, *overrides)
    model, pad_id = parts.model, parts.tokenizer.pad_token_id
    graphs = MicroBatchGraphs(model, parts.train_examples, pad_id, say=lambda *_: None)
    params, lengths = graphs.params, graphs.lengths
    windows = [parts.train_examples[:4], parts.train_examples[4:9]]
    run_cfg = tiny_cfg(*overrides)
    for w, examples in enumerate(windows):
        mbs = [[i] for i in range(len(examples))]
        batches = window_batches(mbs, examples, run_cfg, parts.collate_fn, "cuda")
        scale = torch.tensor(1 / 300.0, dtype=torch.float64, device="cuda")
        for p in params:
            p.grad = None
        torch.manual_seed(10 + w)
        eager_losses = []
        for b in batches:
            tokens = padded_tokens(b["input_ids"].size(1))
            row = padded_row(b, tokens, row_slots(lengths, tokens, max(lengths)), max(lengths), pad_id)
            loss = model_loss_sum(model, row)
            (loss * scale.float()).backward()
            eager_losses.append(loss.detach())
        del loss  # its autograd graph (kept alive, its nodes would be the default stream's in the capture)
        eager = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        torch.manual_seed(10 + w)
        graph_losses = [graphs.run(b, scale) for b in batches]
        torch.cuda.synchronize()
        assert graphs.off is None and graphs.graphs, graphs.off  # captured, replayed after the first of a size
        for got, want in zip(graph_losses, eager_losses):
            assert rel(got, want) < 1e-5, (w, got, want)
        for p, want in zip(params, eager):
            assert p.grad is not None and rel(p.grad, want) < 3e-2, (w, rel(p.grad, want))
    assert len(graphs.graphs) == 2  # rows of 512 and of 1024 tokens


@pytest.mark.cuda
def test_cuda_replayed_evaluation_equals_eager_and_shares_the_pool_with_training(tiny_cfg, tmp_path):
    """Evaluation rows of two padded sizes: replayed, the sums are the eager ones, before and
    after training graphs have been captured and replayed in the same memory pool (the weights
    unchanged: no optimizer step)."""
    from medqa_loop.batching import eval_micro_batches

    overrides = ["model.dtype=bfloat16", "lora.dropout=0.1", "data.pack_tokens=600", "train.micro_batch_size=1"]
    parts = build(tiny_cfg, tmp_path, *overrides)
    model, pad_id = parts.model, parts.tokenizer.pad_token_id
    graphs = MicroBatchGraphs(model, parts.train_examples + parts.val_examples, pad_id, say=lambda *_: None)
    lengths = [len(e["input_ids"]) for e in parts.val_examples]
    batches = [to_device(parts.collate_fn([parts.val_examples[i] for i in mb]), "cuda")
               for mb in eval_micro_batches(lengths, "pack", 4, 600)][:6]
    assert len({padded_tokens(b["input_ids"].size(1)) for b in batches}) == 2

    def evaluated(with_graphs: bool) -> list[torch.Tensor]:
        model.eval()
        with torch.no_grad():
            sums = [graphs.evaluate(b) if with_graphs else eval_sums(model_logits(model, b), b) for b in batches]
        model.train()
        return sums

    eager = evaluated(False)
    for _ in range(2):  # eager then captured, then replayed
        for got, want in zip(evaluated(True), eager):
            assert rel(got, want) < 1e-5, (got, want)
    assert len(graphs.eval_graphs) == 2 and graphs.off is None
    scale = torch.tensor(1 / 300.0, dtype=torch.float64, device="cuda")
    train_batches = window_batches([[0], [1], [2]], parts.train_examples, tiny_cfg(*overrides), parts.collate_fn, "cuda")
    for _ in range(2):
        for b in train_batches:
            graphs.run(b, scale)
    assert graphs.graphs and graphs.off is None
    for got, want in zip(evaluated(True), eager):
        assert rel(got, want) < 1e-5, (got, want)
