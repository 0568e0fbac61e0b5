"""The one command (medqa_loop.cli, ``medqa`` / ``python -m medqa_loop``): its sub-commands, their
help, and how each one ends on a bad invocation: exit 2 and one line
``medqa <command>: error: <message>`` on stderr, no traceback."""

import re
import subprocess
import sys

import pytest

from medqa_loop import cli

from conftest import subprocess_env

COMMANDS = ["train", "generate", "export", "replay", "selftest", "plot"]
# What bitsandbytes 0.50 logs (logging's last-resort handler: stderr) when imported on a CPU with
# AVX512-BF16 and without the `kernels` package.


def medqa(capsys, *argv) -> tuple[int, str, str]:
    """``medqa ...`` in-process: (exit code, stdout, stderr). It always ends with SystemExit."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def listed_commands(help_text: str) -> list[str]:
    """The sub-commands a --help lists, in order: the indented lines under its command list."""
    section = help_text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return re.findall(r"^    (\w+)\s", section, flags=re.MULTILINE)


def test_help_lists_the_six_sub_commands(capsys):
    code, out, err = medqa(capsys, "--help")
    assert code == 0 and err == ""
    assert out.startswith("usage: medqa ")
    assert listed_commands(out) == COMMANDS
    for name in COMMANDS:  # each with its one-line summary
        summary = cli.COMMANDS[name][0]
        assert re.search(rf"^    {name}\s+{re.escape(summary[:30])}", out, flags=re.MULTILINE), name


def test_python_m_medqa_loop_is_the_medqa_command(tmp_path):
    """Run from outside the checkout, with no PYTHONPATH: the installed package answers."""
    proc = subprocess.run(
        [sys.executable, "-m", "medqa_loop", "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: medqa ") and listed_commands(proc.stdout) == COMMANDS
    assert "Traceback" not in proc.stderr


def test_help_imports_no_torch(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom medqa_loop import cli\ntry:\n    cli.main(['--help'])\n"
         "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_subprocesses_import_the_package_the_tests_import(tmp_path):
    """What the subprocess tests run (cwd outside the checkout, no PYTHONPATH) is the package this
    session imported: the installed one under MEDQA_TEST_INSTALLED=1 (tests/conftest.py)."""
    import medqa_loop

    proc = subprocess.run(
        [sys.executable, "-c", "import medqa_loop; print(medqa_loop.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == medqa_loop.__file__


@pytest.mark.parametrize("name", COMMANDS)
def test_each_sub_command_has_its_help(capsys, name):
    code, out, err = medqa(capsys, name, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: medqa {name} ")
    assert cli.COMMANDS[name][0] in " ".join(out.split())  # its summary, as the description


def bad_invocations(tmp_path) -> dict[str, list[str]]:
    """One invocation per sub-command that must be refused, before any model weights load."""
    (tmp_path / "not-a-run").mkdir()
    return {
        "train": ["train", "--config", "tiny", "--set", f"output_dir={tmp_path / 'run'}", "--set", "train.lerning_rate=1"],
        "generate": ["generate", "--adapter", tmp_path / "no-such-adapter", "What is sepsis?"],
        "export": ["export", "--adapter", tmp_path / "no-such-adapter", "--out", tmp_path / "merged"],
        "replay": ["replay", "--run", tmp_path / "no-such-run", "--step", "2"],
        "selftest": ["selftest", "--config", "tiny", "--set", "lora.rank=4"],
        "plot": ["plot", tmp_path / "not-a-run"],
    }


# What each message names (the path or key at fault).
EXPECTED = {
    "train": "unknown config key 'train.lerning_rate'",
    "generate": "adapter directory not found",
    "export": "adapter directory not found",
    "replay": "is not a run directory (no config.yaml)",
    "selftest": "unknown config key 'lora.rank'",
    "plot": "holds no metrics.jsonl",
}


def assert_one_error_line(name: str, err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"medqa {name}: error: ") and EXPECTED[name] in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", COMMANDS)
def test_a_bad_invocation_exits_2_with_one_error_line(capsys, tmp_path, monkeypatch, name):
    import medqa_loop.model as M

    def boom(*a, **k):
        raise AssertionError("model weights loaded despite a bad invocation")

    monkeypatch.setattr(M, "load_base", boom)
    code, out, err = medqa(capsys, *bad_invocations(tmp_path)[name])
    assert code == 2
    assert_one_error_line(name, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_a_bad_invocation_as_a_user_runs_it_exits_2_with_one_error_line(tmp_path, name):
    """The same, in a process of its own (``python -m medqa_loop``, from outside the checkout):
    nothing else on stderr, no traceback, however the libraries log."""
    proc = subprocess.run(
        [sys.executable, "-m", "medqa_loop", *map(str, bad_invocations(tmp_path)[name])],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_error_line(name, proc.stderr)


def test_usage_errors_are_argparse_s_exit_2(capsys):
    code, _, err = medqa(capsys, "generate", "--adapter", "x", "--top-p", "0", "q?")
    assert code == 2 and err.strip() == "medqa generate: error: --top-p must be in (0, 1]"
    code, _, err = medqa(capsys, "replay", "--run", "x")  # --step is required
    assert code == 2 and "medqa replay: error: the following arguments are required: --step" in err
    code, _, err = medqa(capsys, "fly")
    assert code == 2 and "invalid choice: 'fly'" in err
