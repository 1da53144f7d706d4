"""Benchmark scoring in ``pd-lightning validate --ckpt_path … --eval.tasks …`` (the ``--eval.*`` options).

``check`` runs before the validation loop and refuses bad input (unknown task, missing data file, missing checkpoint,
unreadable baseline, tokenizer other than the checkpoint's) before anything is written; ``score`` runs after it on
the module holding the checkpoint's weights: the tasks through lm-eval (``StudentLM`` on the live student, requests
shared across ranks), a printed table, a results JSON and a markdown table beside it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pd_lightning.eval.scoring import (  # noqa: F401  (check_limit_and_shots, shots_per_task: imported from here before)
    check_generation_settings,
    check_limit_and_shots,
    check_output_path,
    length_note,
    resolve_tokenizer,
    score_module,
    shots_per_task,
)


@dataclass
class BenchmarkOptions:
    """Benchmark scoring of ``pd-lightning validate`` (skipped when ``tasks`` is empty).

    Args:
        tasks: benchmarks to score (hellaswag, winogrande, piqa, mmlu, c3, ceval, gsm8k); empty = held-out loss only.
        data_dir: the local benchmark files, ``<data_dir>/<task>/<split>.jsonl`` (``pd-lightning eval-data``).
        baseline: a results JSON of an earlier ``validate`` (e.g. the LM-only student): adds Δ% per task and average.
        output: results JSON to write (a ``.md`` table beside it); default ``<default_root_dir>/bench-<ckpt>.json``.
        limit: documents per task (an int), or a fraction of each (0 < limit < 1), or None for all; for MMLU and
            C-Eval it applies per subject (as lm-eval's own ``--limit`` does for a group).
        num_fewshot: few-shot count for every task (an int) or per task (``{c3: 2, mmlu: 0}``; the others keep the
            paper's: 0 / 5 / 8); None = the paper's.
        batch_size: rows per forward.
        max_gen_toks: cap on generated tokens (GSM8k).
        tokenizer: tokenizer folder (default: the data's); refused if it is not the checkpoint's.
        seed: few-shot sampling seed.
    """

    tasks: list[str] = field(default_factory=list)
    data_dir: str = "data/eval"
    baseline: str | None = None
    output: str | None = None
    limit: float | None = None
    num_fewshot: int | dict[str, int] | None = None
    batch_size: int = 8
    max_gen_toks: int = 256
    tokenizer: str | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        # --eval.* without --eval.tasks would be ignored silently: the user surely meant to score something.
        given = [f"--eval.{k}" for k in ("baseline", "output", "limit", "num_fewshot", "tokenizer")
                 if getattr(self, k) is not None]  # fmt: skip
        given += ["--eval.data_dir"] if self.data_dir != "data/eval" else []
        if not self.tasks and given:
            raise ValueError(
                f"{', '.join(given)} given without --eval.tasks; add e.g. --eval.tasks '[hellaswag,piqa]' to score "
                "the checkpoint on the benchmarks, or drop the --eval options for the held-out loss only"
            )


def _checkpoint_record(ckpt_path: str) -> dict:
    """The ``pd_lightning`` record of a checkpoint (tokenizer fingerprint, seq_len), read without its tensors."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"--ckpt_path {ckpt_path!r} is not a readable checkpoint ({type(e).__name__})") from None
    return dict(ckpt.get("pd_lightning") or {}) if isinstance(ckpt, dict) else {}


def baseline_setting_differences(opts: BenchmarkOptions) -> list[str]:
    """What the baseline results JSON (of an earlier ``validate``) was scored with that this run is not: shots per
    task and the document limit. Δ% across different settings compares different measurements; a plain
    ``{task: score}`` baseline records no settings and is taken as it is."""
    import json

    from pd_lightning.eval.tasks import DEFAULT_FEWSHOT

    config = json.loads(Path(opts.baseline).read_text(encoding="utf-8")).get("config")
    if not isinstance(config, dict):
        return []
    shots = {**DEFAULT_FEWSHOT, **(shots_per_task(opts.num_fewshot, opts.tasks) or {})}
    theirs = config.get("num_fewshot") or {}
    name = f"--eval.baseline {opts.baseline!r}"
    out = [
        f"{name} scored {t} {theirs[t]}-shot, this run {shots[t]}-shot; its Δ% compares different settings"
        for t in opts.tasks
        if t in theirs and theirs[t] != shots[t]
    ]
    if "limit" in config and config["limit"] != opts.limit:
        out.append(
            f"{name} was scored with limit {config['limit']}, this run with {opts.limit}; "
            "its Δ% compares different documents"
        )
    return out


def check(opts: BenchmarkOptions, ckpt_path: str | None, datamodule) -> dict:
    """Refuse bad input before the run; returns what ``score`` needs (tokenizer, baseline scores, output path)."""
    from pd_lightning.corpus.tokenizer import load_tokenizer, tokenizer_fingerprint
    from pd_lightning.eval.report import load_baseline
    from pd_lightning.eval.tasks import KNOWN_TASKS, check_data

    unknown = [t for t in opts.tasks if t not in KNOWN_TASKS]
    if unknown:
        raise ValueError(f"--eval.tasks: unknown task {unknown[0]!r} (known: {', '.join(KNOWN_TASKS)})")
    if not ckpt_path:
        raise ValueError("--eval.tasks scores a checkpoint: pass --ckpt_path <file.ckpt>")
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} does not exist")
    check_limit_and_shots(opts.limit, opts.num_fewshot, "--eval.limit", "--eval.num_fewshot")
    from pd_lightning.model.config import declared_max_length

    max_length = declared_max_length(getattr(datamodule, "seq_len", None))
    check_generation_settings(opts.tasks, opts.batch_size, opts.max_gen_toks, max_length, "--eval.batch_size",
                              "--eval.max_gen_toks")  # fmt: skip
    if opts.output:
        check_output_path(opts.output, "--eval.output")
    if isinstance(opts.num_fewshot, dict):
        unused = sorted(set(opts.num_fewshot) - set(opts.tasks))
        if unused:
            print(f"pd-lightning: warning: --eval.num_fewshot names {', '.join(unused)}, which --eval.tasks does not "
                  "score; ignored", file=sys.stderr)  # fmt: skip
    check_data(opts.data_dir, opts.tasks, shots_per_task(opts.num_fewshot, opts.tasks))
    baseline = load_baseline(opts.baseline, opts.tasks) if opts.baseline else None
    if opts.baseline:
        for line in baseline_setting_differences(opts):
            print(f"pd-lightning: warning: {line}", file=sys.stderr)
    tok = load_tokenizer(resolve_tokenizer(opts.tokenizer, datamodule, "--eval.tokenizer"), flag="--eval.tokenizer")
    trained_with = _checkpoint_record(ckpt_path).get("tokenizer_fingerprint")
    if trained_with and tokenizer_fingerprint(tok) != trained_with:
        raise ValueError(
            f"--eval.tokenizer: {ckpt_path!r} was trained with tokenizer {trained_with}, the given one is "
            f"{tokenizer_fingerprint(tok)}; pass the tokenizer folder the student was trained with"
        )
    output = Path(opts.output) if opts.output else None
    if output is not None and output.suffix != ".json":
        raise ValueError(f"--eval.output {opts.output!r} must end in .json (the markdown table goes beside it)")
    return {"tokenizer": tok, "baseline": baseline, "output": output}


def score(trainer, module, opts: BenchmarkOptions, prepared: dict, ckpt_path: str) -> dict:
    """Score the module (holding the checkpoint's weights) on ``opts.tasks``; print the table, write JSON + .md."""
    from pd_lightning.eval.report import text_table, with_deltas, write_results

    start = time.perf_counter()
    result = score_module(trainer, module, prepared["tokenizer"], opts.tasks, opts.data_dir,
                          num_fewshot=opts.num_fewshot, limit=opts.limit, seed=opts.seed, batch_size=opts.batch_size,
                          max_gen_toks=opts.max_gen_toks, progress=trainer.is_global_zero)  # fmt: skip
    summary = with_deltas({t: float(result["scores"][t]) for t in opts.tasks}, float(result["average"]),
                          prepared["baseline"])  # fmt: skip
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    step = module.loaded_step if module.loaded_step is not None else trainer.global_step
    summary.update({"checkpoint": str(ckpt_path), "step": step, **val,
                    "results": result.get("results", {}), "config": result.get("config", {}),
                    "lengths": result["lengths"],
                    "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
    if trainer.is_global_zero:
        output = prepared["output"] or Path(trainer.default_root_dir) / f"bench-{Path(ckpt_path).stem}.json"
        json_path, md_path = write_results(summary, output)
        print(length_note(result["lengths"]))
        print(text_table(summary))
        print(f"wrote {json_path} and {md_path}")
    return summary
