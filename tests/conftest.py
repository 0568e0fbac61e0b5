import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Nothing in the tests may reach a hub: fail at once instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its files (README, accelerate configs), never its package
# The tests' own modules that a config or a subprocess names by import path (user_plugins) or runs
# (inject_fault): on sys.path here, and the only PYTHONPATH a subprocess gets.
SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

# The shipped preset, by name: what runs is the installed package's configs/tiny.yaml.
TINY = "tiny"


def pytest_report_header(config):
    import medqa_loop

    return f"medqa_loop {medqa_loop.__version__} imported from {medqa_loop.__file__}"


def pytest_sessionstart(session):
    """CI installs the wheel and sets MEDQA_TEST_INSTALLED=1: the tests must then run that package,
    not the checkout's folder (which is what `python -m pytest` from the checkout would import)."""
    import medqa_loop

    where = Path(medqa_loop.__file__).resolve()
    if os.environ.get("MEDQA_TEST_INSTALLED") == "1" and ROOT in where.parents:
        pytest.exit(
            f"MEDQA_TEST_INSTALLED=1 but medqa_loop was imported from the checkout ({where}), not "
            "from the installed package: run `pytest` (not `python -m pytest`, which puts the "
            "current directory first on sys.path) with the wheel installed",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def subprocess_env(helpers: bool = False, **extra: str) -> dict:
    """The environment of a subprocess that runs the installed package: no PYTHONPATH, or only the
    tests' helper modules (tests/support) when ``helpers``; ``extra`` on top (None unsets)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if helpers:
        env["PYTHONPATH"] = str(SUPPORT)
    return {k: v for k, v in {**env, **extra}.items() if v is not None}


def rel(a, b) -> float:
    """Relative L2 distance of a from b, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def set_lora(model, seed: int = 0) -> None:
    """Every LoRA matrix from one seeded generator (B non-zero, so every LoRA gradient is)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def loss_and_grads(model, batch, seed: int = 5):
    """A batch's loss sum (model_loss_sum) and the LoRA gradients of its backward, the dropout
    masks drawn after ``torch.manual_seed(seed)``; no gradient is left on the model."""
    from medqa_loop.model import model_loss_sum

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


class OpLog(TorchDispatchMode):
    """Records every aten op that runs under it, backward included: (name, shapes of its tensor
    arguments), in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((func.overloadpacket.__name__, shapes))
        return func(*args, **(kwargs or {}))

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.ops}

    def matmul_shapes(self) -> list[tuple]:
        """(rows x inner, inner x cols) of each 2-D matmul: mm(a, b), addmm(c, a, b), c.addmm_(a, b)."""
        return [shapes[-2:] for name, shapes in self.ops if name in ("mm", "addmm", "addmm_")]


@pytest.fixture
def tiny_cfg(tmp_path):
    """The shipped tiny preset writing into a fresh temporary run directory."""
    from medqa_loop.config import load_config

    def make(*overrides: str):
        return load_config(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture
def silent_hub():
    """The URL of a hub endpoint that accepts connections and never answers (a network that
    swallows requests): the hub client's requests without a timeout wait on it forever."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:  # the kernel accepts; nobody replies
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def refusing_hub():
    """The URL of a hub endpoint that refuses connections (nothing listens on its port)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def tokenizer():
    from medqa_loop.config import ModelConfig
    from medqa_loop.model import load_tokenizer

    return load_tokenizer(ModelConfig(tokenizer="mistral-common"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A short tiny run through the real entry point, shared by the generate and export tests:
    4 optimizer steps, evaluations at steps 0, 2 and 4, each sampling 2 validation answers."""
    from medqa_loop.config import load_config
    from medqa_loop.train import run

    cfg = load_config(TINY, [
        f"output_dir={tmp_path_factory.mktemp('trained') / 'run'}",
        "train.max_steps=4", "train.eval_every=2", "train.eval_max_batches=2",
        "train.sanity_eval_batches=1", "train.sample_questions=2", "train.sample_max_new_tokens=12",
    ])
    run(cfg)
    return cfg


@pytest.fixture(scope="session")
def traced_run(tmp_path_factory):
    """Two traced steps (dropout on), snapshots before both, a recording hook at step 2, a clip
    threshold low enough that both steps are clipped: shared by the trace, replay and plot tests.
    Returns (cfg, run dir, what the run printed, the hook's calls)."""
    import contextlib
    import io

    import user_plugins
    from medqa_loop.config import load_config
    from medqa_loop.train import run

    out = tmp_path_factory.mktemp("traced") / "run"
    cfg = load_config(TINY, [
        f"output_dir={out}", "data.batching=pad", "train.max_steps=2", "train.grad_accum_steps=2", "train.sanity_eval_batches=0",
        "train.max_grad_norm=0.1", "debug.enabled=true", "debug.snapshot_steps=[1, 2]",
        "debug.pause_at=[2]", "debug.hooks=[user_plugins:record]",
    ])
    user_plugins.CALLS.clear()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        run(cfg)
    return cfg, out, stdout.getvalue(), list(user_plugins.CALLS)


@pytest.fixture(scope="session")
def lora_parts(tmp_path_factory):
    """(cfg, prepared run) of the tiny config with LoRA dropout off and LoRA B filled with seeded
    N(0, 0.02), so every LoRA gradient is non-zero and repeatable: for gradient comparisons.
    Built once per session; tests must leave its weights as they found them."""
    from medqa_loop.config import load_config
    from medqa_loop.train import prepare_run

    # bitsandbytes' LLM.int8 matmul (the path with per-batch outlier columns) and padded batches:
    # what the gradient-debugging and self-test comparisons examine.
    cfg = load_config(TINY, [f"output_dir={tmp_path_factory.mktemp('parts') / 'run'}", "lora.dropout=0.0",
                             "model.int8_matmul=bnb", "data.batching=pad"])
    parts = prepare_run(cfg)
    parts.model.train()  # from_pretrained leaves the base in eval mode; the loop trains in train mode
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in parts.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return cfg, parts


@pytest.fixture
def import_probe(tmp_path, monkeypatch):
    """The file tests/support/import_probe.py creates when it is imported (``import_probe:mask``, a
    mask; ``import_probe:hook``, a pause hook): absent until then. The module is imported afresh in
    each test that uses this."""
    marker = tmp_path / "import_probe.imported"
    monkeypatch.setenv("MEDQA_IMPORT_PROBE", str(marker))
    sys.modules.pop("import_probe", None)
    yield marker
    sys.modules.pop("import_probe", None)


class BaseLoaded(Exception):
    """What loading a base model raises under the ``no_base`` fixture."""


@pytest.fixture
def no_base(monkeypatch):
    """Loading a base model (medqa_loop.model.load_base) raises BaseLoaded: a test sees what a
    run does, or refuses, before the weights load."""

    def load_base(*args, **kwargs):
        raise BaseLoaded

    monkeypatch.setattr("medqa_loop.model.load_base", load_base)


# The file the code shipped with adapter_naming_code's base creates when transformers runs it.
BASE_CODE_RAN = "base_code.ran"


@pytest.fixture
def adapter_naming_code(trained_run, tmp_path, import_probe) -> Path:
    """trained_run's final adapter as if downloaded: a copy of the run directory (adapter, its
    random-init base) whose config.yaml names a mask and a pausing hook in import_probe and sets
    model.trust_remote_code, and whose base's config.json maps AutoConfig to code of its own
    (which creates BASE_CODE_RAN beside the adapter when run: a MistralConfig of its own, by the
    name transformers finds the model class by)."""
    import json
    import shutil

    import yaml

    src, run = Path(trained_run.output_dir), tmp_path / "downloaded"
    for part in ("final", "base"):
        shutil.copytree(src / part, run / part)
    raw = yaml.safe_load((src / "config.yaml").read_text())
    raw["model"]["trust_remote_code"] = True
    raw["data"]["mask"] = "import_probe:mask"
    raw["debug"].update(enabled=True, pause_at=[1], hooks=["import_probe:hook"])
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    (run / "base" / "base_code.py").write_text(
        f"from pathlib import Path\n\nimport transformers\n\nPath({str(run / BASE_CODE_RAN)!r}).touch()\n\n\n"
        "class MistralConfig(transformers.MistralConfig):\n    pass\n"
    )
    config = json.loads((run / "base" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "base_code.MistralConfig"}
    (run / "base" / "config.json").write_text(json.dumps(config))
    return run / "final"
