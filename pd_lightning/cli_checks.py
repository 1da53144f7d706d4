"""Checks the two LightningCLIs run before any work starts (called from ``pd_lightning.lightning_cli``).

- ``before_instantiate``: ``--weights_only`` is forced to True (``false`` is refused: unpickling a checkpoint's
  code can run anything), and ``--ckpt_path`` is opened with ``checkpoint_io.load_checkpoint`` (one line for a
  missing, truncated, corrupt, foreign or weights-only checkpoint) before the trainer exists.
- ``check_trainer_outputs``: every folder the run will write (``default_root_dir``, each ``ModelCheckpoint``'s
  ``dirpath``, each logger's save dir) can be created and written, before the first step.
- ``check_validation_data``: ``validate`` refuses data without validation sequences (Lightning would run nothing,
  print nothing and exit 0).
"""

from __future__ import annotations

import os

from pd_lightning.checkpoint_io import check_ckpt_path
from pd_lightning.paths import check_output_dir


def before_instantiate(config, subcommand: str | None) -> None:
    """``config`` is the subcommand's parsed namespace (``cli.config[subcommand]``)."""
    if subcommand is None:
        return
    if "weights_only" in config:
        if config["weights_only"] is False:
            raise ValueError(
                "--weights_only false is refused: pd-lightning loads checkpoints with torch's weights-only unpickler "
                "only (a checkpoint's pickled code could run anything); Lightning's checkpoints need nothing else"
            )
        config["weights_only"] = True
    # "fsdp", an FSDPStrategy or ModelParallelStrategy (FSDP2) class_path or instance: only they read a sharded folder
    fsdp = any(s in str((config.get("trainer") or {}).get("strategy")).lower() for s in ("fsdp", "modelparallel"))
    check_ckpt_path(config.get("ckpt_path"), subcommand, fsdp=fsdp)


def check_trainer_outputs(trainer) -> None:
    """Refuse, before the run, output folders that cannot be created or written (see ``paths.check_output_dir``)."""
    check_output_dir(trainer.default_root_dir, "--trainer.default_root_dir")
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        if getattr(cb, "dirpath", None):
            check_output_dir(cb.dirpath, "--trainer.callbacks (ModelCheckpoint dirpath)")
    for logger in getattr(trainer, "loggers", []):
        save_dir = getattr(logger, "save_dir", None) or getattr(logger, "root_dir", None)
        if save_dir:
            check_output_dir(save_dir, f"--trainer.logger ({type(logger).__name__} save_dir)")


def check_validation_data(datamodule) -> None:
    """``validate`` with no validation sequences is an error, naming the flag to change."""
    dataset = datamodule.val_dataset() if hasattr(datamodule, "val_dataset") else None
    if dataset is not None and len(dataset) > 0:
        return
    if getattr(datamodule, "val_sequences", None) == 0:
        why = "--data.val_sequences is 0"
    elif hasattr(datamodule, "val_file") and datamodule.val_file is None:
        why = "--data.val_tokens is not set (the token file whose val part scores the model)"
    else:
        path = getattr(getattr(datamodule, "tokens", None), "path", None) or getattr(datamodule, "val_file", None)
        where = f" {str(getattr(path, 'path', path))!r}" if path is not None else ""
        why = f"the token file{where} has no validation part (prepare it with --val_fraction > 0)"
    raise ValueError(f"validate: no validation data: {why}")


def check_checkpoint_folder(trainer, ckpt_path) -> None:
    """``fit`` (not resuming) refuses a ModelCheckpoint folder outside ``--trainer.default_root_dir`` that already holds
    checkpoints: a config that names its folder (the demo teacher's ``runs/demo/teacher``) would otherwise have a run
    moved elsewhere with ``--trainer.default_root_dir`` overwrite the other run's ``teacher.ckpt`` / ``last.ckpt``."""
    if ckpt_path:
        return
    root = os.path.realpath(trainer.default_root_dir)
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        folder = getattr(cb, "dirpath", None)
        if not isinstance(folder, str):
            continue
        real = os.path.realpath(folder)
        if real == root or real.startswith(root + os.sep) or not os.path.isdir(real):
            continue
        held = sorted(name for name in os.listdir(real) if name.endswith(".ckpt"))
        if held:
            raise ValueError(
                f"fit: the checkpoint folder {folder} (a ModelCheckpoint dirpath from the config) already holds "
                f"{', '.join(held[:3])}{' …' if len(held) > 3 else ''} of another run and is outside "
                f"--trainer.default_root_dir {trainer.default_root_dir}, so this run would overwrite them; pass "
                f"--trainer.callbacks.init_args.dirpath {trainer.default_root_dir} too (or resume with --ckpt_path)"
            )


def after_instantiate(trainer, datamodule, subcommand: str | None, ckpt_path=None) -> None:
    """TrainCLI, once the trainer and data exist and before the subcommand runs."""
    if subcommand in ("fit", "validate", "test"):
        check_trainer_outputs(trainer)
    if subcommand == "fit":
        check_checkpoint_folder(trainer, ckpt_path)
    if subcommand == "validate":
        check_validation_data(datamodule)


def before_instantiate_predict(config, subcommand: str | None) -> None:
    """PredictCLI: the same ``--weights_only`` rule, and ``--writer.output`` must be a folder that can be written."""
    before_instantiate(config, subcommand)
    output = (config.get("writer") or {}).get("output")
    if output:
        check_output_dir(output, "--writer.output")
