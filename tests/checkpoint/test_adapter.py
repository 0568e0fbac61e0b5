"""Adapters (medqa_loop.checkpoint.adapter): what the loop saves is PEFT's layout with its
tokenizer, and an adapter directory resolves to its base and its run's settings, with errors that
name the path before anything is loaded."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from medqa_loop.checkpoint.adapter import ADAPTER_WEIGHTS, AdapterError, resolve_adapter


def test_the_loops_adapters_are_peft_directories_with_their_tokenizer(trained_run):
    out = Path(trained_run.output_dir)  # 4 steps: final/ only, no epoch ended
    files = {p.name for p in (out / "final").iterdir()}
    assert {ADAPTER_WEIGHTS, "adapter_config.json", "tokenizer_config.json"} <= files
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == trained_run.lora.r


def test_a_moved_run_finds_its_own_base(trained_run, tmp_path):
    """adapter_config.json records the base path as it was at training time; a run directory
    that was moved still resolves to the base beside it."""
    moved = tmp_path / "moved"
    shutil.copytree(trained_run.output_dir, moved)
    src = resolve_adapter(moved / "final")
    assert src.recorded_base == str(Path(trained_run.output_dir) / "base")
    assert src.base == str(moved / "base")
    assert src.run.data.prompt_template == trained_run.data.prompt_template


def test_resolve_adapter_names_what_is_missing(trained_run, tmp_path):
    with pytest.raises(AdapterError, match=f"adapter directory not found: {tmp_path / 'nope'}"):
        resolve_adapter(tmp_path / "nope")
    with pytest.raises(AdapterError, match="is not a PEFT adapter directory"):
        resolve_adapter(trained_run.output_dir)  # the run directory, not its adapter
    copy = tmp_path / "run" / "final"
    shutil.copytree(Path(trained_run.output_dir) / "final", copy)
    (copy / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=f"has no {ADAPTER_WEIGHTS}"):
        resolve_adapter(copy)



@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "lm_head"]])
def test_an_adapter_holds_its_lora_weights_only_and_saving_it_asks_the_hub_nothing(tmp_path, monkeypatch, targets):
    """PEFT's default save (save_embedding_layers="auto") asks the hub for the config of a base
    named by hub name, to see whether the vocabulary was resized (each adapter and state save of a
    run over a hub base, waiting on the network), and adds the frozen embedding or lm_head weights
    when one is a LoRA target (GBs of unchanged weights per save on a 7B base). The project never
    trains or resizes them: nothing is asked (offline mode off, every hub request failing here)
    and only LoRA matrices are saved."""
    import httpx2
    from accelerate import Accelerator
    from huggingface_hub import constants
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from medqa_loop.checkpoint.adapter import save_adapter

    base = MistralForCausalLM(MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    ))
    base.name_or_path = "alecocc/mistral-7B-SFT-medqa-graph-cot"  # as from_pretrained of the hub name sets it
    model = get_peft_model(base, LoraConfig(r=2, target_modules=targets))
    asked = []

    def no_network(client, request, **kwargs):
        asked.append(str(request.url))
        raise httpx2.ConnectError("no network in this test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(httpx2.Client, "send", no_network)
    out = save_adapter(Accelerator(), model, tmp_path / "adapter")
    assert asked == []
    saved = load_file(out / ADAPTER_WEIGHTS)
    assert len(saved) == 2 * len(targets) and all(".lora_" in k for k in saved), sorted(saved)
