"""lm-eval's own command line with the ``pd-lightning`` model registered and the seven local tasks.

lm-eval 0.4.13 finds models only in its own registry (no plug-in entry points), so this wrapper imports
``pd_lightning.eval.lm`` (which registers ``StudentLM`` as ``pd-lightning``) and then runs lm-eval's CLI::

    pd-lightning-lm-eval --model pd-lightning --model_args checkpoint=runs/x.ckpt \\
        --tasks hellaswag,piqa --data_dir data/eval --device cpu --output_path results/

(or ``python -m pd_lightning.eval.lm_eval_cli ...``). ``--data_dir`` is the one option added to lm-eval's: it
writes the task YAMLs for that data folder (``pd_lightning.eval.tasks.write_task_dir``) to a temporary folder and
passes it as ``--include_path``. Every other option is lm-eval's (``--num_fewshot``, ``--limit``, ``--log_samples``...).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path


def _pop_option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _fail(message: str) -> None:
    print(f"pd-lightning-lm-eval: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_model_paths(args: list[str]) -> None:
    """Refuse a missing checkpoint / model folder / tokenizer before lm-eval starts (it indexes its tasks first),
    and a local model folder without tokenizer files (``export-hf`` without ``--tokenizer``) for any model."""
    model_args = _option(args, "--model_args") or ""
    pairs = dict(item.split("=", 1) for item in model_args.split(",") if "=" in item)
    folder = Path(pairs.get("pretrained", ""))
    if "pretrained" in pairs and "tokenizer" not in pairs and (folder / "config.json").is_file():
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            _fail(
                f"--model_args pretrained={pairs['pretrained']!r} holds no tokenizer; export it with "
                "`pd-lightning export-hf … --tokenizer <folder>` or add tokenizer=<folder> to --model_args"
            )
    if _option(args, "--model") not in ("pd-lightning", "pd_lightning"):
        return
    for key in ("checkpoint", "pretrained", "tokenizer"):
        if key in pairs and not Path(pairs[key]).exists():
            _fail(f"--model_args {key}={pairs[key]!r} does not exist")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    data_dir = _pop_option(args, "--data_dir")
    _check_model_paths(args)
    with tempfile.TemporaryDirectory(prefix="pd_lightning_tasks_") as tmp:
        if data_dir is not None:
            from pd_lightning.eval.tasks import KNOWN_TASKS, write_task_dir

            tasks = _option(args, "--tasks") or ",".join(KNOWN_TASKS)
            shots = _option(args, "--num_fewshot")
            try:
                # lm-eval ignores --num_fewshot for a task whose YAML says 0 shots, so the YAMLs get the count too
                # (and the data check then asks for the few-shot files that count needs, not the defaults').
                if shots is not None and not shots.lstrip("-").isdigit():
                    raise ValueError(f"--num_fewshot must be a whole number, got {shots!r}")
                per_task = None if shots is None else dict.fromkeys(tasks.split(","), int(shots))
                write_task_dir(data_dir, tmp, tasks, num_fewshot=per_task)
            except (FileNotFoundError, ValueError) as e:
                _fail(str(e))
            included = _pop_option(args, "--include_path")
            args += ["--include_path", tmp if included is None else f"{tmp}:{included}"]
        from lm_eval.__main__ import cli_evaluate

        import pd_lightning.eval.lm  # noqa: F401  (registers the pd-lightning model)

        saved = sys.argv
        sys.argv = ["lm-eval", *args]
        try:
            cli_evaluate()
        except (FileNotFoundError, ValueError) as e:  # e.g. a tokenizer that does not match the checkpoint
            _fail(str(e))
        finally:
            sys.argv = saved


if __name__ == "__main__":
    main()
