"""Data parallel: two CPU processes over gloo make the same run as one with twice the accumulation."""

import subprocess
import sys
from types import SimpleNamespace

import psutil  # an accelerate dependency
import pytest
import torch
from safetensors.torch import load_file

from medqa_loop.batching import accumulation_windows, epoch_order, zero_weight_batch
from medqa_loop.checkpoint.state import verify_state
from medqa_loop.distributed import LaunchError, check_processes
from medqa_loop.losses import weighted_loss_sum
from medqa_loop.metrics import read_metrics
from medqa_loop.train import prepare_run, run

from conftest import ROOT, TINY, subprocess_env

# 42 rows -> 33 train pairs -> 17 micro-batches of 2. Windows of 4 x 2 processes = 8 micro-batches:
# the last window of each epoch holds one, so rank 1 has nothing in it. Step 4 is in epoch 2.
# Dropout off: each process draws its own dropout masks, one process draws them in another order.
SHARED = [
    "data.max_rows=42", "train.max_steps=4", "lora.dropout=0.0",
    # One validation pair per process at most in the sanity eval: rank 1 evaluates none.
    "train.sanity_eval_batches=1", "train.eval_batch_size=1",
]


def launch_two_cpu_processes(*args: str, cwd, timeout: int = 400) -> subprocess.CompletedProcess:
    """The shipped multi-GPU accelerate config, on CPUs (gloo) through ACCELERATE_USE_CPU=1, with
    the installed package run from ``cwd`` (outside the checkout).

    Processes whose collectives get out of step wait forever: past ``timeout`` the launcher and
    its workers (torchrun starts each in a session of its own) are killed and the test fails.
    """
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_config_multi_gpu.yaml"), "-m", "medqa_loop.train", *args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(ACCELERATE_USE_CPU="1"),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        pytest.fail(f"2-process run hung for {timeout}s (collectives out of step?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def adapter(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_accumulation(tiny_cfg, tmp_path):
    """The real 8-bit path (default LLM.int8 threshold), launched as users launch it.

    Both runs put the same pairs in the same micro-batches (rank r takes micro-batches r, r+2, ...
    of each window), so every forward, bitsandbytes' per-batch outlier split included, is the
    same; only the order in which micro-batch gradients are summed differs (DDP's all-reduce vs
    local accumulation): fp32 rounding, measured ~1e-6 relative on the adapter and <1e-6 on the
    losses after 4 AdamW steps; both are checked at 1e-5. A normaliser that is not summed over
    processes, or a lost or doubled micro-batch, is off by percents (the step-1 loss by 3%).
    """
    world_windows = [accumulation_windows(epoch_order(33, 42, 0), 2, 4, rank=r, world=2) for r in (0, 1)]
    assert len(world_windows[0][-1]) == 1 and world_windows[1][-1] == []  # the case under test

    ddp_dir = tmp_path / "ddp"
    overrides = [f"output_dir={ddp_dir}", *SHARED]
    proc = launch_two_cpu_processes("--config", TINY, *(a for o in overrides for a in ("--set", o)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2 (MULTI_CPU, gloo)" in proc.stdout and "33 train / 9 validation" in proc.stdout
    assert proc.stdout.count("done in ") == 1 and proc.stderr.count(" 0/4 [") == 1  # main prints, one bar

    run(tiny_cfg(*SHARED, "train.grad_accum_steps=8"))
    one_dir = tmp_path / "run"

    ddp, one = read_metrics(ddp_dir / "metrics.jsonl"), read_metrics(one_dir / "metrics.jsonl")
    key = lambda r: (r["step"], "loss" in r)  # noqa: E731
    assert [key(r) for r in ddp] == [key(r) for r in one]  # each record written once (main only)
    assert [r["step"] for r in ddp if "eval_loss" in r] == [0, 3]  # sanity, end of epoch 1
    for d, o in zip(ddp, one):
        for name in ("loss", "eval_loss"):
            if name in o:
                assert d[name] == pytest.approx(o[name], rel=1e-5), (d, o)
        if "target_tokens" in o:
            assert d["target_tokens"] == o["target_tokens"]

    a, b = adapter(ddp_dir), adapter(one_dir)
    assert a.keys() == b.keys()
    diff = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt() / sum(v.pow(2).sum() for v in b.values()).sqrt()
    assert diff < 1e-5
    assert (ddp_dir / "epoch-1" / "adapter_model.safetensors").is_file()

    # The epoch-end state holds each process's RNGs, gathered to the main process, which wrote
    # them; resumed from it by both processes, step 4 comes out bitwise the same.
    state = ddp_dir / "state" / "step-3"
    assert verify_state(state)["num_processes"] == 2
    assert sorted(p.name for p in state.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    resumed = launch_two_cpu_processes(
        "--config", TINY, *(a for o in overrides for a in ("--set", o)), "--resume", str(state), cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = adapter(ddp_dir)
    assert again.keys() == a.keys() and all(torch.equal(again[k], a[k]) for k in a)


def test_zero_weight_batch_reaches_every_lora_matrix_with_zero_gradient(tiny_cfg):
    """What lets an empty rank join DDP's all-reduce without changing the update."""
    parts = prepare_run(tiny_cfg())
    with torch.no_grad():  # LoRA B starts at 0; make every gradient path non-trivial
        for n, p in parts.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = zero_weight_batch(parts.train_examples[0], parts.collate_fn, parts.accelerator.device)
    assert batch["loss_weights"].sum() == 0 and (batch["labels"] == -100).all()
    logits = parts.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = weighted_loss_sum(logits, batch["labels"], batch["loss_weights"])
    loss.backward()
    trainable = [p for p in parts.model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)  # every DDP bucket becomes ready
    assert all(torch.count_nonzero(p.grad) == 0 for p in trainable) and loss.item() == 0.0


def test_processes_the_launcher_started_but_accelerate_did_not_join_are_an_error():
    alone = SimpleNamespace(
        num_processes=1, distributed_type=SimpleNamespace(value="NO"), state=SimpleNamespace(backend=None),
        device="cpu",
    )
    with pytest.raises(LaunchError, match=r"started 2 processes.*ACCELERATE_USE_CPU=1"):
        check_processes(alone, {"WORLD_SIZE": "2"})
    assert check_processes(alone, {}) == "processes: 1 (NO); main process on cpu"
