"""Configs and checkpoints written before the cache and the corpus moved out of ``pd_lightning.data`` keep working.

Issue 19 moved ``pd_lightning/data/*`` into ``pd_lightning/cache/`` and ``pd_lightning/corpus/``. The old module
names must still import (as the same module objects), a YAML config whose ``class_path``s name the old modules must
train, and a checkpoint that names them must resume.
"""

from __future__ import annotations

import importlib

import torch
import yaml

from pd_lightning.cli import main
from pd_lightning.data import MOVED
from tests.test_train import quiet_trainer_args, small_token_file, train_losses

OLD_CACHE_DM = "pd_lightning.data.cache_datamodule.CacheDataModule"
OLD_TOKEN_DM = "pd_lightning.data.datamodule.TokenDataModule"
NEW_TOKEN_DM = "pd_lightning.corpus.datamodule.TokenDataModule"


def test_every_old_module_name_is_the_moved_module():
    assert len(MOVED) == 16  # every module that lived in pd_lightning/data/
    for old, new in MOVED.items():
        module = importlib.import_module(f"pd_lightning.data.{old}")
        assert module is importlib.import_module(new), old
        assert module.__spec__.name == new  # the real module's spec, not the alias's
    from pd_lightning.cache.datamodule import CacheDataModule
    from pd_lightning.corpus.datamodule import TokenDataModule
    from pd_lightning.data import cache_reader  # the attribute form

    module, name = OLD_CACHE_DM.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is CacheDataModule
    module, name = OLD_TOKEN_DM.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is TokenDataModule
    assert cache_reader.TeacherCache is importlib.import_module("pd_lightning.cache").TeacherCache


def _strings(value) -> list[str]:
    """Every string inside nested dicts/lists/tuples (keys included)."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_a_config_and_a_checkpoint_from_before_the_move_train_and_resume(prepared, tmp_path):
    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=24, n_val=8)
    config = tmp_path / "old.yaml"  # a config written before the move: class_paths in pd_lightning.data
    config.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 7,
                "model": {"student": {"preset": "tiny"}, "lr": 3e-3},
                "data": {"class_path": OLD_TOKEN_DM, "init_args": {"path": str(tokens), "batch_size": 4}},
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "filename": "{step}"},
                        }
                    ],
                    "limit_val_batches": 0,
                },
            }
        )
    )
    straight = tmp_path / "straight"
    main(["fit", "--config", str(config), *quiet_trainer_args(straight, 6)])
    reference = train_losses(straight)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    saved = yaml.safe_load((straight / "log" / "version_0" / "config.yaml").read_text())
    assert saved["data"]["class_path"] in (OLD_TOKEN_DM, NEW_TOKEN_DM)

    # A checkpoint names classes (its data module state is stored under "TokenDataModule"), never a module path, so
    # one written before the move reads unchanged; this one stands for it.
    ckpt = next(straight.rglob("step=3.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "TokenDataModule" in state
    assert not [s for s in _strings({k: v for k, v in state.items() if k != "state_dict"}) if "pd_lightning." in s]

    resumed = tmp_path / "resumed"
    main(["fit", "--config", str(config), *quiet_trainer_args(resumed, 6), "--ckpt_path", str(ckpt)])
    assert train_losses(resumed) == {s: v for s, v in reference.items() if s > 3}  # exactly the straight run's
