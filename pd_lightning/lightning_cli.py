"""LightningCLI subclass behind `pd-lightning fit|validate|test` (the student) and the predict CLI (teacher)."""

from __future__ import annotations

import logging
import os
import threading
import warnings

import lightning as L
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


def _finish_on_stop_signals() -> None:
    """Once a ``pd-lightning fit`` process has completed its run, SIGTERM / SIGINT during what is left (returning
    through the CLI, interpreter shutdown) end it at once with exit code 0, in one line: the run is complete, and a
    scheduler or `pd-lightning sweep` must not see it as stopped (the default handlers would exit 143 / 130)."""
    import signal
    import sys

    def finish(signum, frame) -> None:
        name = signal.Signals(signum).name
        os.write(2, f"pd-lightning: {name} received after the run completed; exiting (exit code 0)\n".encode())
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a stream busy in the interrupted code: its buffer is lost, nothing else
                pass
        os._exit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, finish)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored (a shell's background job): it stays so
            signal.signal(signal.SIGINT, finish)


class HeldLogs(logging.Handler):
    """Lightning's log lines ("Seed set to …", "GPU available: …", "TPU available: …", "Restoring states from the
    checkpoint …") held back until the run starts, so that bad input found while the Trainer sets up (the data
    module, the model, the checkpoint restore) is reported alone: one ``pd-lightning: error:`` line on stderr.

    ``hold()`` puts this handler in place of the handlers of Lightning's loggers; ``replay()`` puts them back and
    replays the held records through them, in order (a run that starts prints exactly what it printed before);
    ``drop()`` puts them back and forgets the records (the run stopped on bad input). Both are idempotent."""

    LOGGERS = ("lightning.pytorch", "lightning.fabric")

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def hold(self) -> None:
        for name in self.LOGGERS:
            log = logging.getLogger(name)
            self._saved[name] = (list(log.handlers), log.propagate)
            log.handlers, log.propagate = [self], False

    def _restore(self) -> list[logging.LogRecord]:
        for name, (handlers, propagate) in self._saved.items():
            log = logging.getLogger(name)
            log.handlers, log.propagate = handlers, propagate
        self._saved = {}
        records, self.records = self.records, []
        return records

    def replay(self) -> None:
        for record in self._restore():
            logger = next(n for n in self.LOGGERS if record.name == n or record.name.startswith(n + "."))
            logging.getLogger(logger).handle(record)

    def drop(self) -> None:
        self._restore()


def _bad_input(e: BaseException) -> bool:
    """What ``pd_lightning.cli.main`` reports as one ``pd-lightning: error:`` line."""
    from argparse import ArgumentError

    from pd_lightning.checkpointing import write_error
    from pd_lightning.cli import _user_errors

    return isinstance(e, (*_user_errors(), ArgumentError)) or (isinstance(e, OSError) and write_error(e) is not None)


class ReplayLogs(L.Callback):
    """Replays the held Lightning lines (``HeldLogs``) when the run starts: after the set-up and the checkpoint
    restore, where bad input is found."""

    def __init__(self, logs: HeldLogs) -> None:
        self.logs = logs

    def _replay(self, *args) -> None:
        self.logs.replay()

    on_fit_start = on_validation_start = on_test_start = on_predict_start = _replay


class TrainCLI(LightningCLI):
    """LightningCLI for the student: links the data's runtime values into the model (never typed twice)."""

    def __init__(self, *args, **kwargs) -> None:
        self._owns_process = kwargs.get("args") is None  # the `pd-lightning` command itself, not a call from Python
        self._logs = HeldLogs()
        self._logs.hold()
        try:
            super().__init__(*args, **kwargs)
        except BaseException as e:
            (self._logs.drop if _bad_input(e) else self._logs.replay)()
            raise
        self._logs.replay()

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.student.vocab_size", apply_on="instantiate")
        parser.link_arguments("trainer.max_steps", "model.max_steps", compute_fn=_positive_or_none)
        parser.set_defaults(
            {
                "data": {
                    "class_path": "pd_lightning.corpus.datamodule.TokenDataModule",
                    "init_args": {"path": DEMO_TOKENS},
                }
            }
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
        if self.trainer.world_size > 1:  # several processes: their set-up lines (process group, …) as they come
            self._logs.replay()

    def instantiate_trainer(self, **kwargs):
        from pd_lightning import checkpointing, summary

        trainer = super().instantiate_trainer(**kwargs)
        checkpointing.install(trainer)  # atomic checkpoint writes, a checkpoint on SIGTERM, throughput figures
        summary.install(trainer)  # the model summary's FLOPs: the student's forward on one micro-batch
        trainer.callbacks.insert(0, ReplayLogs(self._logs))  # Lightning's lines once the run starts
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

    def _quiet_resumable_data(self) -> None:
        """Lightning warns on every mid-epoch resume that "your dataloader is not resumable" because the
        DataLoader itself has no ``state_dict``; a ``SequenceDataModule`` keeps the position (epoch, samples
        consumed per rank, shuffle seed) in the checkpoint and its sampler resumes exactly
        (``tests/test_train.py::test_exact_resume``). Exactly that message is silenced (for this fit only)."""
        from pd_lightning.corpus.datamodule import SequenceDataModule

        if isinstance(self.datamodule, SequenceDataModule):
            warnings.filterwarnings(
                "ignore",
                message=r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is "
                r"not resumable\.",
            )

    def fit(self, model, **kwargs) -> None:
        """``trainer.fit``. A run stopped before its end exits ``EXIT_INTERRUPTED`` (143) on SIGTERM and
        ``EXIT_SIGINT`` (130) on Ctrl-C, never 0, after saving ``last.ckpt`` (``checkpointing.StopCheckpoint``); a
        signal once training is complete stops nothing: the run says it is complete and exits 0."""
        import sys

        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from pd_lightning.checkpointing import (
            EXIT_INTERRUPTED,
            EXIT_SIGINT,
            StopCheckpoint,
            training_complete,
            write_error,
        )

        trainer = self.trainer
        stop = next((c for c in trainer.callbacks if isinstance(c, StopCheckpoint)), None) or StopCheckpoint()
        if stop not in trainer.callbacks:
            trainer.callbacks.insert(0, stop)

        def step() -> str:
            return f"step {trainer.global_step} of {trainer.max_steps if trainer.max_steps > 0 else 'the run'}"

        def say(message: str) -> None:
            if trainer.is_global_zero:
                print(f"pd-lightning: {message}", file=sys.stderr, flush=True)

        try:
            with stop.signals(trainer), warnings.catch_warnings():
                self._quiet_fresh_checkpoint_folders()
                self._quiet_resumable_data()
                trainer.fit(model, **kwargs)
        except OSError as e:
            if write_error(e) is None:
                raise
            raise ValueError(self._write_failed(e)) from None
        except SIGTERMException:
            if not training_complete(trainer):
                how = stop.stopped_by or "SIGTERM"
                code = EXIT_SIGINT if how == "SIGINT" else EXIT_INTERRUPTED
                where = f"resume with --ckpt_path {stop.path}" if stop.path else "no checkpoint could be saved"
                what = "interrupted by SIGINT (Ctrl-C)" if how == "SIGINT" else "stopped by SIGTERM"
                say(f"{what} at {step()}, before the end; {where} (exit code {code})")
                raise SystemExit(code) from None
            stop.after_end = stop.after_end or stop.stopped_by or "SIGTERM"
        except (KeyboardInterrupt, SystemExit) as e:
            # A second Ctrl-C: Lightning's own handling ("graceful shutdown", exit 1) or a KeyboardInterrupt outside it.
            if stop.sigints < 2 or (isinstance(e, SystemExit) and e.code not in (1, None)):
                raise
            say(
                f"interrupted twice by SIGINT (Ctrl-C) at {step()}: stopped at once, nothing saved since the last "
                f"checkpoint (exit code {EXIT_SIGINT})"
            )
            raise SystemExit(EXIT_SIGINT) from None
        late = stop.after_end or stop.stopped_by
        if late:
            say(f"{late} received after training completed ({step()}); the run is complete (exit code 0)")
        if self._owns_process:
            _finish_on_stop_signals()

    def _write_failed(self, e: OSError) -> str:
        """One line for a write that failed during ``fit`` (a full disk while saving a checkpoint, ...): the file and
        the reason (``paths.describe_os_error``), and the checkpoint to resume from once it is fixed (atomic saves
        leave every earlier one intact)."""
        import glob

        from pd_lightning.checkpointing import stop_checkpoint_path, write_error
        from pd_lightning.paths import describe_os_error

        message = describe_os_error(write_error(e)) or str(e)
        last = stop_checkpoint_path(self.trainer)
        if os.path.isfile(last):
            return f"{message}; the checkpoints saved before are intact: resume with --ckpt_path {last}"
        saved = sorted(glob.glob(os.path.join(os.path.dirname(last), "*.ckpt")), key=os.path.getmtime)
        if saved:
            return f"{message}; the checkpoints saved before are intact: resume with --ckpt_path {saved[-1]}"
        return message

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
    from pd_lightning.corpus.datamodule import SequenceDataModule
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
