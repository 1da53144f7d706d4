"""Scoring a live student on the benchmarks: what ``pd-lightning validate --eval.*`` (``pd_lightning.eval.validate``)
and the training callback (``pd_lightning.eval.callback``) share, so neither imports the other.

``score_module`` runs the tasks through lm-eval on the module's own ``Transformer`` (``StudentLM.from_module``: no
copy), each rank scoring a share of the requests (``ShardedLM``), with the training mode and random states restored
afterwards. It scores with the student's declared maximum length (``declared_max_length``: what ``export-hf`` writes
as ``max_position_embeddings`` and lm-eval's ``hf`` model reads), so its numbers equal lm-eval ``hf``'s on the export;
the result records that length, the training length, and how many requests were longer than each.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def preserved_training_state(module: torch.nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag and the Python / NumPy / torch (CPU, CUDA) RNG states on exit."""
    modes = [(m, m.training) for m in module.modules()]
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def resolve_tokenizer(tokenizer: str | None, datamodule, flag: str) -> str:
    """The tokenizer folder: the one given, else the training data's (``datamodule.tokenizer_path``)."""
    if tokenizer:
        return tokenizer
    for owner in (datamodule, getattr(datamodule, "val_file", None)):
        path = getattr(owner, "tokenizer_path", None) if owner is not None else None
        if path:
            return str(path)
    raise ValueError(f"{flag}: the training data does not name its tokenizer folder; set {flag} <folder>")


def check_limit_and_shots(
    limit: float | None, num_fewshot: int | dict[str, int] | None, limit_flag: str, shots_flag: str
) -> None:
    """A limit is a document count (a whole number >= 1) or a fraction in (0, 1); shots are >= 0, and a per-task
    mapping names known tasks only."""
    from pd_lightning.eval.tasks import KNOWN_TASKS

    if limit is not None and (limit <= 0 or (limit >= 1 and limit != int(limit))):
        raise ValueError(
            f"{limit_flag} must be a number of documents (a whole number >= 1) or a fraction in (0, 1), got {limit}"
        )
    per_task = num_fewshot if isinstance(num_fewshot, dict) else {"": num_fewshot}
    for task, n in per_task.items():
        if task and task not in KNOWN_TASKS:
            raise ValueError(f"{shots_flag}: unknown task {task!r} (known: {', '.join(KNOWN_TASKS)})")
        if n is not None and n < 0:
            raise ValueError(f"{shots_flag} must be >= 0, got {n}" + (f" for {task}" if task else ""))


def check_generation_settings(
    tasks: list[str], batch_size: int, max_gen_toks: int, max_length: int, batch_flag: str, gen_flag: str
) -> None:
    """A batch of at least one row; ``max_gen_toks`` of at least one token and, when a task generates (GSM8k),
    below the scoring length (lm-eval's ``hf`` model refuses the same: no room would be left for the prompt)."""
    if batch_size < 1:
        raise ValueError(f"{batch_flag} must be >= 1, got {batch_size}")
    if max_gen_toks < 1:
        raise ValueError(f"{gen_flag} must be >= 1, got {max_gen_toks}")
    if "gsm8k" in tasks and max_gen_toks >= max_length:
        raise ValueError(
            f"{gen_flag} {max_gen_toks} leaves no room for the prompt in the student's maximum length {max_length} "
            f"(GSM8k generates); give a value below {max_length}"
        )


def check_output_path(path: str, flag: str) -> None:
    """Refuse, before any work, an output file whose folder cannot be made (an existing file in the way)."""
    from pathlib import Path

    p = Path(path).absolute()
    if p.is_dir():
        raise ValueError(f"{flag} {path!r} is a folder; give a file name")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path!r}: {str(parent)!r} is a file, so the folder cannot be made")
            break


def shots_per_task(num_fewshot: int | dict[str, int] | None, tasks: list[str]) -> dict[str, int] | None:
    """``num_fewshot`` as ``{task: shots}``: one int for every task, a mapping for the tasks it names (the others
    keep the paper's default), None for the defaults."""
    if num_fewshot is None:
        return None
    if isinstance(num_fewshot, dict):
        return {t: int(n) for t, n in num_fewshot.items() if t in tasks}
    return dict.fromkeys(tasks, int(num_fewshot))


def length_summary(lengths: list[tuple[int, int]], max_length: int, trained_length: int | None) -> dict:
    """What the requests' lengths were against the scoring length and the training length.

    ``lengths`` holds ``(tokens before any cut, tokens the model saw)`` per request (a log-likelihood request's
    context + continuation − 1, a generation's prompt). Returns ``requests``, ``longest`` (before any cut),
    ``cut`` (requests longer than ``max_length``, cut from the left as lm-eval cuts them) and ``beyond_trained``
    (requests the model saw with more tokens than ``trained_length``: it extrapolates there)."""
    return {
        "max_length": int(max_length),
        "trained_length": int(trained_length) if trained_length else None,
        "requests": len(lengths),
        "longest": max((full for full, _ in lengths), default=0),
        "cut": sum(full > seen for full, seen in lengths),
        "beyond_trained": sum(seen > trained_length for _, seen in lengths) if trained_length else 0,
    }


def length_note(summary: dict) -> str:
    """One line for the user: the scoring length, where it comes from, and the requests past the training length."""
    line = (
        f"scored at max length {summary['max_length']:,} (the student's declared length, export-hf's "
        "max_position_embeddings, as lm-eval's hf model scores the export)"
    )
    n, trained = summary["requests"], summary["trained_length"]
    if trained and summary["beyond_trained"]:
        line += (
            f"; trained on {trained:,}-token sequences, it extrapolates on {summary['beyond_trained']:,} of {n:,} "
            f"requests (longest {summary['longest']:,} tokens)"
        )
    elif trained:
        line += f"; no request runs past its {trained:,}-token training length"
    if summary["cut"]:
        line += f"; {summary['cut']:,} requests longer than {summary['max_length']:,} were cut from the left"
    return line


def _gather_lengths(lengths: list[tuple[int, int]]) -> list[tuple[int, int]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return lengths
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lengths)
    return [pair for part in gathered for pair in part]


def score_module(
    trainer,
    module,
    tokenizer,
    tasks: list[str],
    data_dir: str,
    *,
    num_fewshot: int | dict[str, int] | None = None,
    limit: float | None = None,
    seed: int = 1234,
    batch_size: int = 8,
    max_gen_toks: int = 256,
    max_length: int | None = None,
    progress: bool = False,
) -> dict:
    """Score ``module`` (a ``DistillationModule``, on every rank of the run) on ``tasks``; returns ``evaluate``'s
    report with ``config.max_length`` / ``config.trained_length`` and ``lengths`` (``length_summary``) added.

    ``max_length`` None = the student's declared length (``declared_max_length`` of the training ``seq_len``).

    Under FSDP1 (Lightning's ``FSDPStrategy``: ``trainer.strategy.model`` is the ``FullyShardedDataParallel`` root
    around ``module``) the student's parameters are flat shards outside the root's forward, so they are gathered
    whole for the duration (``full_fsdp1_parameters``: each rank then holds the whole model; see there for the
    memory cost) and every rank scores its share on its own, without lockstep. FSDP2 (DTensor parameters) scores in
    lockstep with the parameters left sharded (``ShardedLM``)."""
    from pd_lightning.eval.distributed import ShardedLM, fsdp1_root, full_fsdp1_parameters, single_process_view
    from pd_lightning.eval.lm import StudentLM
    from pd_lightning.eval.runner import evaluate

    kw = {"batch_size": batch_size, "max_gen_toks": max_gen_toks, "progress": progress}
    if max_length:
        kw["max_length"] = int(max_length)
    root = fsdp1_root(trainer, module)
    with preserved_training_state(module), single_process_view(), full_fsdp1_parameters(root) as gathered:
        lm = StudentLM.from_module(module, tokenizer, **kw)
        sharded = ShardedLM(lm, lockstep=False if gathered else None)
        result = evaluate(sharded, tasks, data_dir, num_fewshot=shots_per_task(num_fewshot, tasks),
                          limit=limit, seed=seed)  # fmt: skip
    summary = length_summary(_gather_lengths(lm.request_lengths), lm.max_length, lm.trained_length)
    result["config"].update({"max_length": lm.max_length, "trained_length": lm.trained_length})
    result["lengths"] = summary
    return result
