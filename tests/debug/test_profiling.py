"""torch.profiler around chosen steps (medqa_loop.debug.profiling), through the real run."""

import gzip
import json
from pathlib import Path

import pytest

from medqa_loop.train import run


@pytest.mark.slow
def test_profile_steps_write_a_trace_and_an_op_table_for_those_steps_only(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=3", "train.profile_steps=[2]", "train.sanity_eval_batches=0")
    run(cfg)
    out = Path(cfg.output_dir)
    profile = out / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["step-2.json.gz", "step-2.txt"]
    trace = json.loads(gzip.decompress((profile / "step-2.json.gz").read_bytes()))
    names = {e.get("name") for e in trace["traceEvents"]}
    # the step's forward, backward and optimizer ran inside the recording
    assert {"aten::mm", "aten::embedding"} <= names and any("Backward" in str(n) for n in names)
    assert any("Optimizer.step" in str(n) for n in names)
    table, summary = (profile / "step-2.txt").read_text().rstrip().rsplit("\n", 1)
    assert "aten::mm" in table and "Self CPU" in table
    assert json.loads(summary)["wall_s"] > 0
    # the other steps ran and were logged as usual
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]
