"""The ``pd-lightning`` command.

    pd-lightning fit|validate|test --config ...   train / score the student (LightningCLI, DistillationModule)
    pd-lightning predict --config ...             run a teacher over a token file, write the logits cache
    pd-lightning prepare ...                      text -> packed token file (HDF5)
    pd-lightning cache-info PATH [--json]         figures of a logits cache, every checksum verified
    pd-lightning cache-plan --tokens 100e9 ...    expected size, shards, disk and bandwidth of a cache
    pd-lightning cache-upgrade OLD --output NEW   a schema-1 cache -> the current format
    pd-lightning export-hf ...                    student checkpoint -> Hugging Face Llama folder
    pd-lightning eval-data --output DIR --<task> SRC   benchmark files -> <DIR>/<task>/<split>.jsonl (lm-eval)
    pd-lightning sweep CONFIGS... --output DIR    run experiment YAMLs at a small scale -> results.jsonl/.csv
    pd-lightning report SWEEP                     the paper's figures (PNG) and a markdown table from a sweep

Heavy imports (Lightning, transformers) happen inside the branch that needs them, so ``prepare`` starts fast.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from argparse import ArgumentError

from pd_lightning.errors import check_config_files, one_line
from pd_lightning.paths import CHECKED, describe_os_error

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)
TRAIN_COMMANDS = ("fit", "validate", "test")
FUNCTION_COMMANDS = ("prepare", "cache-info", "cache-plan", "cache-upgrade", "export-hf", "eval-data")  # plain CLIs
COMMANDS = (*TRAIN_COMMANDS, "predict", *FUNCTION_COMMANDS, "sweep", "report")


def _user_errors() -> tuple[type[BaseException], ...]:
    from pd_lightning.cache.format import CacheError

    return (*USER_ERRORS, CacheError)


def _function_cli(fn, args: list[str]) -> None:
    from jsonargparse import CLI

    CLI(fn, args=args, exit_on_error=False)  # main() reports parse errors in one line


def prepare_argv(argv: list[str]) -> list[str]:
    """``prepare --input a.jsonl b.jsonl ...`` (what a shell glob gives) -> ``--input ["a.jsonl", "b.jsonl", ...]``."""
    import json

    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--input":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                j += 1
            values = argv[i + 1 : j]
            out += ["--input", json.dumps(values)] if len(values) > 1 else ["--input", *values]
            i = j
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    from_python = argv is not None
    argv = list(argv) if from_python else sys.argv[1:]
    command = argv[0] if argv else ""
    CHECKED.clear()
    try:
        check_config_files(argv)  # a missing or malformed --config YAML, named with its line
        if command == "prepare":
            from pd_lightning.corpus.prepare import prepare

            _function_cli(prepare, prepare_argv(argv[1:]))
        elif command == "cache-info":
            from pd_lightning.cache.inspect import cache_info_command

            _function_cli(cache_info_command, argv[1:])
        elif command == "cache-plan":  # --from-cache / --teacher-tokens-per-s spelled either way
            from pd_lightning.cache.inspect import cache_plan_command

            flags = ["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in argv[1:]]
            _function_cli(cache_plan_command, flags)
        elif command == "cache-upgrade":
            from pd_lightning.cache.upgrade import cache_upgrade_command

            _interruptible(command, lambda: _function_cli(cache_upgrade_command, argv[1:]))
        elif command == "export-hf":
            from pd_lightning.export import export_checkpoint, export_hf_argv

            _function_cli(export_checkpoint, export_hf_argv(argv[1:]))
        elif command == "eval-data":
            from pd_lightning.eval.data import eval_data

            _function_cli(eval_data, argv[1:])
        elif command == "sweep":
            from pd_lightning.sweep import main as sweep_main

            sweep_main(argv[1:])
        elif command == "report":
            from pd_lightning.report import main as report_main

            report_main(argv[1:])
        elif command == "predict":
            from pd_lightning.lightning_cli import predict_cli

            predict_cli(argv if from_python else None)
        elif command in TRAIN_COMMANDS or command.startswith("-"):  # -h / --help / --version: LightningCLI's
            from pd_lightning.lightning_cli import train_cli

            train_cli(argv if from_python else None)
        else:
            what = f"unknown command {command!r}" if command else "no command given"
            raise ValueError(f"{what}: use one of {', '.join(COMMANDS)} (pd-lightning COMMAND --help)")
    except _user_errors() as e:
        # Bad input: one clear line naming the flag or file, non-zero exit, no traceback.
        message = str(e) if not isinstance(e, KeyError) or not e.args else str(e.args[0])
        if "Does not validate against any of the Union subtypes" in message or 'Parser key "' in message:
            message = one_line(message, command if command in COMMANDS else "")  # raised by jsonargparse's typing
        _fail(message)
    except ArgumentError as e:  # jsonargparse (exit_on_error=False): its multi-line message as one line
        _fail(one_line(e.message, command if command in COMMANDS else "", positional=command in FUNCTION_COMMANDS))
    except OSError as e:  # an output that cannot be written (read-only, disk full, ...) met during the work
        message = describe_os_error(e)
        if message is None:
            raise
        _fail(message)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the work's cleanup runs (the partly written shard is removed)."""


def _interruptible(command: str, work) -> None:
    """Run ``work``; Ctrl-C (exit 130) or SIGTERM (exit 143) end it with one line saying that a rerun resumes."""
    import signal

    def terminate(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        work()
    except (KeyboardInterrupt, _Terminated) as e:
        how, code = ("SIGTERM", 143) if isinstance(e, _Terminated) else ("SIGINT (Ctrl-C)", 130)
        print(
            f"pd-lightning: {command} stopped by {how}; the finished shards are kept: rerun the same command to "
            f"resume (exit code {code})",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(code) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str) -> None:
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"pd-lightning: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
