"""``LMEvalCallback``: score the live student on the benchmarks during training (``--config callbacks/lm_eval.yaml``).

Every ``every_n_steps`` optimizer steps and/or at each checkpoint save, the chosen tasks run through lm-eval on the
module's own ``Transformer`` (``StudentLM.from_module``: no copy). Each task's primary score (in %) and their
average go to every Lightning logger as ``bench/<task>`` and ``bench/average`` at the current step, and into
``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor="bench/average")`` works).

Evaluation does not change training: the module's (and each submodule's) train/eval mode and the Python, NumPy,
torch CPU and CUDA random states are restored afterwards (lm-eval reseeds all of them). Under DDP and FSDP2 every rank
scores a share of the requests and the answers are gathered (``pd_lightning.eval.distributed``; with sharded
parameters the ranks run their forwards in lockstep), so the scores equal a one-process run's. The steps already
scored are part of the callback's checkpoint state: a resumed run does not score them again.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from pd_lightning.eval.scoring import (  # noqa: F401  (preserved_training_state: imported from here before)
    check_generation_settings,
    check_limit_and_shots,
    length_note,
    preserved_training_state,
    resolve_tokenizer,
    score_module,
    shots_per_task,
)


class LMEvalCallback(L.Callback):
    """Benchmark scores of the student during training, logged as ``bench/<task>`` and ``bench/average``.

    Args:
        tasks: benchmarks to run (hellaswag, winogrande, piqa, mmlu, c3, ceval, gsm8k).
        data_dir: the local benchmark files, ``<data_dir>/<task>/<split>.jsonl`` (``pd-lightning eval-data``).
        every_n_steps: score every this many optimizer steps (0 = never on a step count).
        on_checkpoint: score whenever a checkpoint is saved.
        limit: documents per task (an int), or a fraction of each task (0 < limit < 1), or None for all; for MMLU
            and C-Eval it applies per subject (as lm-eval's own ``--limit`` does for a group).
        num_fewshot: few-shot count for every task (an int) or per task (``{c3: 2, mmlu: 0}``; the others keep the
            paper's: 0 / 5 / 8); None = the paper's.
        batch_size: rows per forward of the evaluation.
        max_length: longest evaluation input in tokens (None = the student's declared length, 4,096 or the training
            sequence length if longer: what ``export-hf`` writes as ``max_position_embeddings``, so the scores equal
            lm-eval ``hf``'s on the export).
        max_gen_toks: cap on generated tokens (GSM8k).
        tokenizer: tokenizer folder (None = the training data's tokenizer).
        seed: few-shot sampling seed.
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        data_dir: str = "data/eval",
        every_n_steps: int = 0,
        on_checkpoint: bool = False,
        limit: int | float | None = None,
        num_fewshot: int | dict[str, int] | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        tokenizer: str | None = None,
        seed: int = 1234,
    ) -> None:
        from pd_lightning.eval.tasks import KNOWN_TASKS

        self.tasks = list(tasks) if tasks else list(KNOWN_TASKS)
        unknown = [t for t in self.tasks if t not in KNOWN_TASKS]
        if unknown:
            raise ValueError(f"LMEvalCallback tasks: unknown task {unknown[0]!r} (known: {', '.join(KNOWN_TASKS)})")
        if every_n_steps < 0:
            raise ValueError(f"LMEvalCallback every_n_steps must be >= 0, got {every_n_steps}")
        check_limit_and_shots(limit, num_fewshot, "LMEvalCallback limit", "LMEvalCallback num_fewshot")
        check_generation_settings(self.tasks, batch_size, max_gen_toks, max_length or 10**9,
                                  "LMEvalCallback batch_size", "LMEvalCallback max_gen_toks")  # fmt: skip
        self.data_dir, self.every_n_steps, self.on_checkpoint = data_dir, every_n_steps, on_checkpoint
        self.limit, self.num_fewshot, self.seed = limit, num_fewshot, seed
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self.tokenizer = tokenizer
        self.scored: dict[int, dict[str, float]] = {}  # step -> {task: score, "average": ...}
        self._tok = None
        self._noted = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from pd_lightning.corpus.tokenizer import load_tokenizer
        from pd_lightning.eval.tasks import check_data

        shots = shots_per_task(self.num_fewshot, self.tasks)
        check_data(self.data_dir, self.tasks, shots)  # a missing file fails before training, not at the first score
        from pd_lightning.model.config import declared_max_length

        length = self.max_length or declared_max_length(getattr(trainer.datamodule, "seq_len", None))
        check_generation_settings(self.tasks, self.batch_size, self.max_gen_toks, length,
                                  "LMEvalCallback batch_size", "LMEvalCallback max_gen_toks")  # fmt: skip
        flag = "LMEvalCallback tokenizer"
        self._tok = load_tokenizer(resolve_tokenizer(self.tokenizer, trainer.datamodule, flag), flag=flag)

    # ---- triggers -----------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if getattr(trainer, "received_sigterm", False):  # stopping: save and exit quickly, no collective calls
            return
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step not in self.scored:
            self.score(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if getattr(trainer, "received_sigterm", False):  # the SIGTERM checkpoint: not worth delaying the stop for
            return
        if self.on_checkpoint and trainer.state.fn == "fit" and trainer.global_step not in self.scored:
            self.score(trainer, pl_module)
            # The callbacks' states were collected before this hook: record the new step in the saved one too.
            if self.state_key in checkpoint.get("callbacks", {}):
                checkpoint["callbacks"][self.state_key] = self.state_dict()

    # ---- scoring ------------------------------------------------------------------------------------------------
    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run the tasks on the live student, log ``bench/*`` at the current step and return {task: %, average}."""
        if self._tok is None:
            self.setup(trainer, pl_module, "fit")
        step, start = trainer.global_step, time.perf_counter()
        result = score_module(trainer, pl_module, self._tok, self.tasks, self.data_dir, num_fewshot=self.num_fewshot,
                              limit=self.limit, seed=self.seed, batch_size=self.batch_size,
                              max_gen_toks=self.max_gen_toks, max_length=self.max_length)  # fmt: skip
        if trainer.is_global_zero and not self._noted:  # once per run: the length and the extrapolated requests
            print(f"LMEvalCallback: {length_note(result['lengths'])}", flush=True)
            self._noted = True
        scores = {**{t: float(result["scores"][t]) for t in self.tasks}, "average": float(result["average"])}
        self.scored[step] = scores
        metrics = {f"bench/{k}": v for k, v in scores.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            line = "  ".join(f"{k} {v:.2f}" for k, v in scores.items())
            print(f"step {step:>6d}  bench: {line}  ({time.perf_counter() - start:.1f} s)", flush=True)
        return scores

    # ---- resume -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"scored": {int(k): dict(v) for k, v in self.scored.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.scored = {int(k): dict(v) for k, v in state_dict.get("scored", {}).items()}
