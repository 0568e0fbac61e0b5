"""The start-up question to the hub (medqa_loop.hub): a hub that does not answer, or refuses,
costs at most a few seconds and leaves the process on local files only, saying so; offline mode
set, or nothing named on the hub, asks nothing. Against local servers: no network is used."""

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import datasets.config
import pytest
from huggingface_hub import constants

from medqa_loop import hub
from medqa_loop.config import load_config

from conftest import TINY

HUB_MODEL = "alecocc/mistral-7B-SFT-medqa-graph-cot"


@pytest.fixture
def online(monkeypatch):
    """Offline mode off, as for a user who did not set HF_HUB_OFFLINE (the tests set it); whatever
    a test switches is put back after it. Returns a function that points the hub at a URL."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    probe = hub.hub_answers  # its answers are kept per endpoint: none from another test
    probe.cache_clear()
    yield lambda url: monkeypatch.setattr(constants, "ENDPOINT", url)
    probe.cache_clear()


def offline_everywhere() -> bool:
    import os

    return (
        os.environ.get("HF_HUB_OFFLINE") == "1"
        and constants.HF_HUB_OFFLINE
        and datasets.config.HF_HUB_OFFLINE
    )


def ask(names) -> tuple[list[str], float]:
    said = []
    start = time.monotonic()
    hub.use_local_files_if_unreachable(names, said.append)
    return said, time.monotonic() - start


def test_a_hub_that_never_answers_costs_the_timeout_then_local_files_only(online, silent_hub):
    """Before the probe, a load by hub name waited on such a hub forever."""
    from transformers import AutoConfig

    online(silent_hub)
    said, seconds = ask([HUB_MODEL])
    assert hub.PROBE_TIMEOUT_S - 0.5 < seconds < hub.PROBE_TIMEOUT_S + 1.5
    assert offline_everywhere()
    assert said == [
        (
            f"the hub ({silent_hub}) did not answer within 3 s: using local files only (hub names load from the hub "
            "cache); set HF_HUB_OFFLINE=1 to skip this check, HF_HUB_OFFLINE=0 to always use the hub"
        )
    ]
    start = time.monotonic()
    with pytest.raises(OSError, match="couldn't find them in the cached files"):
        AutoConfig.from_pretrained(HUB_MODEL)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("command", ["generate", "export"])
def test_generate_and_export_ask_the_hub_first(online, silent_hub, trained_run, tmp_path, capsys, command):
    """A base named by hub name (--base, or the adapter's recorded base) behind a silent hub:
    an error naming it within seconds, the notice on stderr (stdout is the command's output)."""
    from medqa_loop.export import export_merged
    from medqa_loop.generate import GenerationSettings, answer_questions
    from medqa_loop.model import ModelLoadError

    online(silent_hub)
    adapter = f"{trained_run.output_dir}/final"
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=f"cannot load model '{HUB_MODEL}'"):
        if command == "generate":
            answer_questions(adapter, ["What is asthma?"], GenerationSettings(), base=HUB_MODEL)
        else:
            export_merged(adapter, tmp_path / "out", base=HUB_MODEL)
    assert time.monotonic() - start < hub.PROBE_TIMEOUT_S + 2
    assert f"the hub ({silent_hub}) did not answer" in capsys.readouterr().err


def test_a_hub_that_refuses_is_known_at_once(online, refusing_hub):
    online(refusing_hub)
    said, seconds = ask(["thesven/SyntheticMedicalQA-4336"])
    assert seconds < 1.5 and offline_everywhere() and len(said) == 1


class _Hub(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, answers", [(200, True), (404, True), (502, False)])
def test_an_http_status_below_500_is_an_answer(online, status, answers):
    """Any reply is an answer, but a 5xx: a proxy's bad gateway, the hub down."""
    server = HTTPServer(("127.0.0.1", 0), _Hub)
    server.status = status
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online(f"http://127.0.0.1:{server.server_port}")
        said, _ = ask([HUB_MODEL])
    finally:
        server.shutdown()
        server.server_close()
    assert (said == []) is answers and offline_everywhere() is not answers


@pytest.mark.parametrize("setting", ["1", "0"])
def test_offline_mode_set_either_way_asks_nothing(online, monkeypatch, setting):
    monkeypatch.setenv("HF_HUB_OFFLINE", setting)
    monkeypatch.setattr(hub, "hub_answers", lambda endpoint: pytest.fail("the hub was asked"))
    assert ask([HUB_MODEL])[0] == []


def test_nothing_named_on_the_hub_asks_nothing(online, monkeypatch, tmp_path):
    """The embedded default (random-init base, shipped tokenizer and sample) and local paths."""
    monkeypatch.setattr(hub, "hub_answers", lambda endpoint: pytest.fail("the hub was asked"))
    tiny = load_config(TINY, [f"output_dir={tmp_path}"])
    assert hub.run_sources(tiny) == ["mistral-common", "embedded:sample_medqa"]
    (tmp_path / "model").mkdir()
    assert ask([*hub.run_sources(tiny), str(tmp_path / "model"), "./data.parquet", None])[0] == []
    assert not offline_everywhere()


def test_what_counts_as_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mistral").mkdir(parents=True)
    assert hub.is_hub_name(HUB_MODEL) and hub.is_hub_name("gpt2")
    for local in (
        "models/mistral",
        "./x",
        "/data/x.parquet",
        "~/m",
        "embedded:sample_medqa",
        "mistral-common",
    ):
        assert not hub.is_hub_name(local), local
    recipe = load_config(None, [])
    assert hub.run_sources(recipe) == [HUB_MODEL, HUB_MODEL, "thesven/SyntheticMedicalQA-4336"]
