"""LightningCLI subclass behind `pd-lightning fit|validate|test` (the student) and the predict CLI (teacher)."""

from __future__ import annotations

import logging
import warnings

from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI

from pd_lightning.progress import ValidationReport

DEMO_TOKENS = "data/demo/tokens.h5"
TRAINER_DEFAULTS = {
    "use_distributed_sampler": False,  # SequenceDataModule shards and resumes its own sampler
    "default_root_dir": "runs",
    "callbacks": [lazy_instance(ValidationReport)],
}


class _NoTips(logging.Filter):
    """Lightning's advertising lines ("💡 Tip: … try installing litlogger / litmodels") carry no information."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Drop Lightning's tips and its notice that the default logger is a CSVLogger (it is ours, on purpose), so a
    run's output is its own; warnings that matter are untouched. Idempotent."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero"):  # fmt: skip
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in log.filters):
            log.addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning's own


def _positive_or_none(max_steps: int | None) -> int | None:
    return max_steps if max_steps is not None and max_steps > 0 else None


class TrainCLI(LightningCLI):
    """LightningCLI for the student: links the data's runtime values into the model (never typed twice)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.student.vocab_size", apply_on="instantiate")
        parser.link_arguments("trainer.max_steps", "model.max_steps", compute_fn=_positive_or_none)
        parser.set_defaults(
            {"data": {"class_path": "pd_lightning.data.datamodule.TokenDataModule", "init_args": {"path": DEMO_TOKENS}}}
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the configuration the user gave when resuming with ``--ckpt_path``.

        Lightning's default replaces the model's arguments by the checkpoint's hyperparameters, silently dropping
        the user's flags. Here the command line and YAMLs rule, and ``DistillationModule.on_load_checkpoint`` refuses
        a checkpoint whose student has another shape, naming the fields that differ.
        """

    def before_instantiate_classes(self) -> None:
        from pd_lightning import cli_checks  # --weights_only forced true, --ckpt_path opened safely, in one line

        cli_checks.before_instantiate(self.config[self.subcommand] if self.subcommand else self.config, self.subcommand)
        from pd_lightning.module import link_wsd_config  # WSD alpha takes WSD-LR's edges, in the saved config too

        link_wsd_config((self.config[self.subcommand] if self.subcommand else self.config).get("model"))

    def after_instantiate_classes(self) -> None:
        from pd_lightning import cli_checks  # output folders writable; validate has validation data

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        cli_checks.after_instantiate(self.trainer, self.datamodule, self.subcommand, cfg.get("ckpt_path"))

    def instantiate_trainer(self, **kwargs):
        from pd_lightning import checkpointing

        trainer = super().instantiate_trainer(**kwargs)
        checkpointing.install(trainer)  # atomic checkpoint writes, a checkpoint on SIGTERM, throughput figures
        return trainer

    def _quiet_fresh_checkpoint_folders(self) -> None:
        """A fresh run whose checkpoints share their folder with its own logs (the demo teacher's
        ``default_root_dir`` = ``dirpath``) writes its config.yaml there before ModelCheckpoint looks, so Lightning
        warned that the folder "exists and is not empty" on every first run. Silenced (for this fit only) for a folder
        that is missing or empty before the run; one that held anything (another run's files, a resume) still warns."""
        import os
        import re

        for callback in self.trainer.checkpoint_callbacks:
            folder = getattr(callback, "dirpath", None)
            if isinstance(folder, str) and (not os.path.isdir(folder) or not os.listdir(folder)):
                message = re.escape(f"Checkpoint directory {folder} exists and is not empty.")
                warnings.filterwarnings("ignore", message=message)

    def fit(self, model, **kwargs) -> None:
        """``trainer.fit``; a run stopped by SIGTERM before its end exits ``EXIT_INTERRUPTED`` (143), never 0."""
        import sys

        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from pd_lightning.checkpointing import EXIT_INTERRUPTED, StopCheckpoint

        try:
            with warnings.catch_warnings():
                self._quiet_fresh_checkpoint_folders()
                self.trainer.fit(model, **kwargs)
        except SIGTERMException:
            if self.trainer.is_global_zero:
                saved = [c.path for c in self.trainer.callbacks if isinstance(c, StopCheckpoint) and c.path]
                where = f"resume with --ckpt_path {saved[0]}" if saved else "no checkpoint could be saved"
                print(
                    f"pd-lightning: stopped by SIGTERM at step {self.trainer.global_step} of "
                    f"{self.trainer.max_steps if self.trainer.max_steps > 0 else 'the run'}, before the end; {where} "
                    f"(exit code {EXIT_INTERRUPTED})",
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(EXIT_INTERRUPTED) from None

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        # `validate` also scores the checkpoint on the benchmarks: --eval.tasks, --eval.data_dir, --eval.baseline, ...
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "validate":
            from pd_lightning.eval.validate import BenchmarkOptions

            parser.add_class_arguments(BenchmarkOptions, "eval", instantiate=False)
        return parser

    def _benchmark_options(self):
        from pd_lightning.eval.validate import BenchmarkOptions

        cfg = self.config[self.subcommand]
        return BenchmarkOptions(**cfg["eval"]), cfg.get("ckpt_path")

    def before_validate(self) -> None:
        # Scoring a checkpoint from another folder restores its ModelCheckpoint state, whose dirpath differs: Lightning
        # then warns that best_model_score etc. are not restored, which is irrelevant to a validation.
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
        opts, ckpt_path = self._benchmark_options()
        if opts.tasks:  # refuse bad input before the validation loop writes anything
            from pd_lightning.eval.validate import check

            self._benchmark = check(opts, ckpt_path, self.datamodule)

    def after_validate(self) -> None:
        opts, ckpt_path = self._benchmark_options()
        if opts.tasks:
            from pd_lightning.eval.validate import score

            score(self.trainer, self.model, opts, self._benchmark, ckpt_path)


def train_cli(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    from pd_lightning.data.datamodule import SequenceDataModule
    from pd_lightning.module import DistillationModule

    quiet_lightning()
    return TrainCLI(
        DistillationModule,
        SequenceDataModule,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},  # cli.main reports parse errors in one line
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


class PredictCLI(LightningCLI):
    """LightningCLI for ``pd-lightning predict``: teacher + logits processor + cache writer (``--writer.*``)."""

    def add_arguments_to_parser(self, parser) -> None:
        from pd_lightning.predict import CacheWriterCallback

        parser.add_lightning_class_args(CacheWriterCallback, "writer")

    def before_instantiate_classes(self) -> None:
        # Predictions go to the cache, not into a list in memory.
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.get("return_predictions") is None:
            cfg["return_predictions"] = False
        from pd_lightning import cli_checks  # --weights_only, --writer.output writable, before the teacher loads

        cli_checks.before_instantiate_predict(cfg, self.subcommand)


def predict_cli(args: list[str] | None = None, run: bool = True) -> PredictCLI:
    from pd_lightning.predict import TeacherLogits, TokenSequences

    quiet_lightning()
    return PredictCLI(
        TeacherLogits,
        TokenSequences,
        trainer_defaults={
            "logger": False,
            "enable_checkpointing": False,
            "default_root_dir": "runs/predict",
            "use_distributed_sampler": False,  # each rank's loader already holds only its own pending sequences
        },
        save_config_callback=None,
        seed_everything_default=False,  # a teacher's forward draws nothing at random (Lightning's default: a warning)
        parser_kwargs={"exit_on_error": False},  # cli.main reports parse errors in one line
        args=args,
        run=run,
    )
