"""Config: strict keys and types, overrides, and errors raised before any model is loaded."""

import pytest

from medqa_loop.config import Config, ConfigError, load_config
from medqa_loop.train import main

from conftest import TINY


def test_default_is_the_original_recipe():
    cfg = load_config()
    assert cfg.model.name_or_path == "alecocc/mistral-7B-SFT-medqa-graph-cot"
    assert cfg.data.dataset == "thesven/SyntheticMedicalQA-4336"
    assert cfg.model.load_in_8bit and not cfg.model.trust_remote_code
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.1)
    t = cfg.train
    assert (t.micro_batch_size, t.grad_accum_steps, t.lr, t.weight_decay) == (1, 16, 1e-4, 0.01)
    assert (t.warmup_steps, t.max_grad_norm, t.eval_every, t.epochs) == (100, 0.3, 50, 3)
    assert load_config("recipe").to_dict() | {"output_dir": None} == (
        Config().to_dict() | {"output_dir": None}
    )


def test_overrides_parse_yaml_values():
    cfg = load_config(TINY, ["train.lr=3e-4", "train.max_steps=7", "lora.target_modules=[q_proj]"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj"]
    assert load_config(TINY, ["train.max_steps=null"]).train.max_steps is None


@pytest.mark.parametrize(
    "override, names",
    [
        ("model.load_in_7Bit=true", ["model.load_in_7Bit", "load_in_8bit"]),  # the recipe's typo
        ("train.grad_acum_steps=4", ["train.grad_acum_steps", "grad_accum_steps"]),
        ("trian.lr=1", ["trian"]),
        ("train.lr=fast", ["train.lr"]),
        ("train.epochs=2.5", ["train.epochs"]),
        ("train.epochs=true", ["train.epochs"]),
        ("model.load_in_8bit=3", ["model.load_in_8bit"]),
        ("train.lr=-1", ["train.lr", "> 0"]),
        ("train.grad_accum_steps=0", ["train.grad_accum_steps"]),
        ("data.val_fraction=1.5", ["data.val_fraction"]),
        ("lora.dropout=1", ["lora.dropout"]),
        ("data.mask=everything", ["data.mask", "completion_only"]),
        ("data.mask='mypkg.masks:'", ["data.mask", "'mypkg.masks:'", "package.module:function"]),
        ("data.mask=my-pkg:fn", ["data.mask", "'my-pkg:fn'", "package.module:function"]),
        ("model.dtype=fp8", ["model.dtype"]),
        ("model.random_init.hiden_size=8", ["model.random_init.hiden_size"]),
        ("train.lr.x=1", ["train.lr"]),
        ("data.prompt_template=Q", ["data.prompt_template", "{input_text}"]),
        ("data.prompt_template='{{input_text}}'", ["data.prompt_template", "must contain '{input_text}'"]),  # a literal
        ("data.prompt_template='Q {topic}: {input_text}'", ["data.prompt_template", "got {topic}", "{{ or }}"]),
        ("data.prompt_template='Q {input_text!r} {}'", ["data.prompt_template", "got {input_text!r}, {}"]),
        ("data.prompt_template='Q {input_text} }'", ["data.prompt_template", "Single '}'", "{{ or }}"]),
        ("train.profile_steps=[0]", ["train.profile_steps", "counted from 1"]),
        ("train.profile_steps=[two]", ["train.profile_steps"]),
    ],
)
def test_bad_config_names_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    for name in names:
        assert name in str(err.value)


def test_reading_a_config_imports_none_of_the_code_it_names(import_probe, tmp_path):
    """A mask and a pausing hook by import path, in a file and by --set: validated by form, never
    imported (the mask is imported when training tokenizes, the hook when a debugger pauses)."""
    names_code = tmp_path / "names_code.yaml"
    names_code.write_text("data:\n  mask: import_probe:mask\ndebug:\n  hooks: [import_probe:hook]\n")
    from_file = load_config(names_code, ["debug.enabled=true", "debug.pause_at=[1]"])
    from_set = load_config(TINY, ["data.mask=import_probe:mask", "debug.hooks=[import_probe:hook]"])
    assert from_file.data.mask == from_set.data.mask == "import_probe:mask"
    assert from_file.debug.hooks == from_set.debug.hooks == ["import_probe:hook"]
    assert not import_probe.exists()


def test_bad_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz.*bad\.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_bad_config_fails_before_any_model_load(monkeypatch, capsys, tmp_path):
    """A typo must cost seconds: the entry point exits with the key named, no model touched."""
    import medqa_loop.model as M

    def boom(*a, **k):
        raise AssertionError("model loaded despite a bad config")

    for name in ("load_base", "load_tokenizer", "build_random_base", "check_model_source"):
        monkeypatch.setattr(M, name, boom)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(TINY), "--set", f"output_dir={tmp_path}", "--set", "model.load_in_7Bit=true"])
    assert exit_.value.code == 2
    assert "model.load_in_7Bit" in capsys.readouterr().err


def test_presets_ship_with_the_package_and_load_by_name():
    from pathlib import Path

    import medqa_loop
    from medqa_loop.config import presets

    shipped = presets()
    assert {"recipe", "tiny"} <= shipped.keys()
    package = Path(medqa_loop.__file__).parent
    assert all(package in path.parents and path.is_file() for path in shipped.values())  # package data
    tiny = load_config("tiny")
    assert tiny.model.random_init["hidden_size"] == 128 and tiny.data.dataset == "embedded:sample_medqa"
    assert load_config("tiny").to_dict() == load_config(shipped["tiny"]).to_dict()  # name == its file
    with pytest.raises(ConfigError, match=r"config file not found: tinyy \(and no shipped preset.*recipe.*tiny"):
        load_config("tinyy")


def test_an_error_names_where_its_key_was_set(tmp_path):
    from medqa_loop.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.epochs=2", "train.lr=-1"])
    assert str(err.value).endswith("(from --set train.lr=-1)") and "tiny.yaml" not in str(err.value)
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(mine, ["train.epochs=2"])
    assert str(err.value).endswith(f"(in {mine})")


def test_a_doubled_brace_in_the_template_stays_a_literal_brace():
    from medqa_loop.data import format_prompt

    cfg = load_config(TINY, ["data.prompt_template='Q {{as JSON}}: {input_text}'"])
    assert format_prompt("why?", cfg.data.prompt_template) == "Q {as JSON}: why?"


@pytest.mark.parametrize("value", ["@home", "a: b: c", "[1, 2", "{input_text} {{x}}"])
def test_a_set_value_that_is_not_yaml_names_the_set(value, capsys, tmp_path):
    item = f"data.prompt_template={value}"
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [item])
    assert str(err.value).startswith(f"--set {item}: the value is not valid YAML (")
    assert "quote it" in str(err.value) and "tiny.yaml" not in str(err.value)  # the --set, not the file
    with pytest.raises(SystemExit) as exit_:
        main(["--config", TINY, "--set", f"output_dir={tmp_path}", "--set", item])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and f"error: --set {item}: the value is not valid YAML" in err


def test_dedupe_is_off_by_default_and_a_bool():
    assert load_config().data.dedupe is False and load_config(TINY, ["data.dedupe=true"]).data.dedupe is True
    with pytest.raises(ConfigError, match="data.dedupe"):
        load_config(TINY, ["data.dedupe=yes please"])
