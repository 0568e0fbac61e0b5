"""The package as a user gets it: what the wheel holds, and the shipped presets."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

import medqa_loop
from medqa_loop.config import load_config, presets


def repository_files() -> set[str]:
    """The files the wheel must hold, as paths inside it: every module and data file of the
    checkout's medqa_loop/ (the configs through their link)."""
    package = ROOT / "medqa_loop"
    kept = {".py", ".jsonl", ".yaml"}
    return {
        p.relative_to(ROOT).as_posix() for p in package.rglob("*")
        if p.is_file() and p.suffix in kept and "__pycache__" not in p.parts
    }


def test_installed_presets_are_the_repositorys_configs():
    shipped = presets()
    assert set(shipped) == {p.stem for p in (ROOT / "configs").glob("*.yaml")} == {"recipe", "tiny"}
    for name, path in shipped.items():
        assert path.read_bytes() == (ROOT / "configs" / f"{name}.yaml").read_bytes(), name
    # by name from anywhere: the preset, not a file of the working directory
    assert load_config("tiny").data.dataset == "embedded:sample_medqa"
    assert load_config("recipe").model.name_or_path == "alecocc/mistral-7B-SFT-medqa-graph-cot"


def test_installed_package_holds_every_module_and_data_file():
    installed = Path(medqa_loop.__file__).parent
    missing = [f for f in repository_files() if not (installed.parent / f).is_file()]
    assert not missing, f"{installed} lacks {missing}"


@pytest.mark.slow
def test_the_wheel_holds_every_module_the_sample_and_the_configs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("medqa_loop-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert repository_files() <= names, sorted(repository_files() - names)
    assert {"medqa_loop/assets/sample_medqa.jsonl", "medqa_loop/configs/tiny.yaml", "medqa_loop/configs/recipe.yaml"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "medqa = medqa_loop.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert wheel.name.startswith(f"medqa_loop-{medqa_loop.__version__}-")
