"""Every YAML in configs/ and callbacks/ starts with the command that runs it, and that command parses."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from pd_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted(p for d in ("configs", "callbacks") for p in (ROOT / d).rglob("*.yaml"))


def header_command(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# pd-lightning "), f"{path}: first line must be '# pd-lightning ...', got {first!r}"
    args = shlex.split(first[len("# pd-lightning ") :])
    rel = str(path.relative_to(ROOT))
    assert rel in args, f"{path}: its header command does not use the file itself"
    return args


def test_there_are_configs():
    names = {str(p.relative_to(ROOT)) for p in YAMLS}
    for s in ("330M", "670M", "1.9B", "3.8B", "6.8B"):
        assert f"configs/students/{s}.yaml" in names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_header_command_parses(path, monkeypatch, capsys):
    yaml.safe_load(path.read_text())
    args = header_command(path)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    out = capsys.readouterr()
    assert e.value.code in (0, None), out.err
    printed = yaml.safe_load(out.out)
    assert isinstance(printed, dict) and "trainer" in printed


@pytest.mark.parametrize("size", ["330M", "670M", "1.9B", "3.8B", "6.8B"])
def test_student_print_config(size, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", "--config", f"configs/students/{size}.yaml", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["student"]["preset"] == size


def _instantiate(spec: dict):
    import importlib

    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_rows_build_their_plugins(path):
    """Each row's plug-ins construct (constructor validation runs) and the module accepts them."""
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.module import DistillationModule

    model = yaml.safe_load(path.read_text())["model"]
    plugins = {k: _instantiate(v) for k, v in model.items() if isinstance(v, dict) and "class_path" in v}
    module = DistillationModule(StudentConfig(preset="tiny", vocab_size=64), max_steps=100, **plugins)
    alphas = [module.alpha_at(s) for s in range(100)]
    assert all(0.0 <= a <= 1.0 for a in alphas)
    if hasattr(plugins.get("alpha"), "warmup_fraction") and "WSDLR" in model["lr_schedule"]["class_path"]:
        # WSD alpha/beta takes its phase edges from the WSD learning rate.
        assert plugins["alpha"].warmup_fraction == plugins["lr_schedule"].warmup_fraction
        assert plugins["alpha"].decay_fraction == plugins["lr_schedule"].decay_fraction
