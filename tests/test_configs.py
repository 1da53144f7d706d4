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


PLUGINS = ("lr_schedule", "loss", "temperature", "alpha")
# Two bases that set every plug-in differently, with non-default values in every field a row could inherit.
BASES = {
    "wsd": {
        "lr_schedule": {
            "class_path": "pd_lightning.distill.lr.WSDLR",
            "init_args": {"warmup_fraction": 0.05, "decay_fraction": 0.2, "min_lr_ratio": 0.3},
        },  # noqa: E501
        "loss": {"class_path": "pd_lightning.distill.losses.KLD", "init_args": {"tail_bucket": True, "hinton": True}},
        "temperature": {"class_path": "pd_lightning.distill.temperature.StaticTemperature", "init_args": {"tau": 7.0}},
        "alpha": {
            "class_path": "pd_lightning.distill.schedules.WSD",
            "init_args": {"alpha_max": 0.3, "alpha_min": 0.2, "warmup_fraction": 0.05, "decay_fraction": 0.2},
        },  # noqa: E501
    },
    "cosine": {
        "lr_schedule": {
            "class_path": "pd_lightning.distill.lr.Cosine",
            "init_args": {"warmup_fraction": 0.3, "min_lr_ratio": 0.5},
        },  # noqa: E501
        "loss": {"class_path": "pd_lightning.distill.losses.NLL", "init_args": {"tail_bucket": True}},
        "temperature": {"class_path": "pd_lightning.distill.temperature.NormKD", "init_args": {"t_norm": 3.0}},
        "alpha": {
            "class_path": "pd_lightning.distill.schedules.Periodic",
            "init_args": {"low": 0.1, "high": 0.2, "period_steps": 3},
        },  # noqa: E501
    },
}
PAPER_ROWS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
# Parsing a row twice takes ~1 s here: the default run resolves a few rows of each kind, `make test-slow` all.
FAST_ROWS = {
    "lm-baseline.yaml",
    "pd-star.yaml",
    "table5-wsd-alpha-cos-lr.yaml",
    "table3-wttm.yaml",
    "table5-period.yaml",
}  # noqa: E501


def _constructor_fields(class_path: str) -> set[str]:
    import importlib
    import inspect

    module, name = class_path.rsplit(".", 1)
    params = list(inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters.values())[1:]
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


@pytest.mark.parametrize("path", PAPER_ROWS, ids=lambda p: p.name)
def test_paper_row_states_every_field_of_its_plugins(path):
    model = yaml.safe_load(path.read_text())["model"]
    assert set(PLUGINS) <= set(model), f"{path.name}: set every plug-in ({PLUGINS}; null where unused)"
    for key in PLUGINS:
        if model[key] is not None:
            given = set(model[key].get("init_args") or {})
            assert given == _constructor_fields(model[key]["class_path"]), (path.name, key, given)


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=() if p.name in FAST_ROWS else pytest.mark.slow, id=p.name) for p in PAPER_ROWS],
)
def test_paper_row_resolves_the_same_on_any_base(path, tmp_path, monkeypatch, capsys):
    """Issue 7: a row switching WSD-LR to Cosine kept WSD's warm-up fraction; each row now resolves to the same
    plug-ins whatever config it is layered on."""
    monkeypatch.chdir(ROOT)
    resolved = {}
    for name, base in BASES.items():
        base_file = tmp_path / f"{name}.yaml"
        base_file.write_text(yaml.safe_dump({"model": base}))
        args = ["fit", "--config", "configs/students/1.9B.yaml", "--config", "configs/data/paper_cache.yaml"]
        with pytest.raises(SystemExit):
            main([*args, "--config", str(base_file), "--config", str(path.relative_to(ROOT)), "--print_config"])
        model = yaml.safe_load(capsys.readouterr().out)["model"]
        resolved[name] = {key: model.get(key) for key in PLUGINS}
    assert resolved["wsd"] == resolved["cosine"], path.name
