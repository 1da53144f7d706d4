"""``LogitRecorder``: records a teacher's training-time logits into a teacher cache while the teacher pre-trains.

Add it to ``pd-lightning fit`` of the teacher (``--trainer.callbacks+ callbacks/recorder.yaml``). During the window
of optimizer steps ``[start_step, end_step)`` (or the last ``last_tokens`` tokens of the run) every training batch's
logits are read **from the same loss pass** that trains the teacher -- chunk by chunk, through the ``observe`` hook
of :func:`~pd_lightning.distill.objective.lm_kd_loss`, so the fused loss still never materialises the ``(N, V)``
logits and no second forward runs -- and passed through a ``LogitsProcessor`` (TopPK, Sampled, Full) exactly as
``pd-lightning predict`` does offline. The per-position statistics (std, entropy, tail mass, ``U_gamma``) are
computed from each position's full distribution. The teacher's training is unchanged: the hook only reads the
logits (tests: losses and weights equal with the recorder on and off).

Each recorded micro-batch is spooled to ``<output>/.recording/part-*.pt`` (uncompressed sparse targets, about
``K * 8 + 20`` bytes per position). **A sequence seen more than once in the window is recorded once: its latest
visit wins** (the logits of the most trained teacher). When the window ends, the distinct recorded sequences, in
ascending order of their index in the token file, become the sequences ``0 .. M-1`` of a cache written through the
offline :class:`~pd_lightning.cache.writer.CacheWriter` (same format, same shards and index), the spool is
deleted, and ``recorded_sequences.npy`` beside the cache maps cache sequence -> token-file sequence. A student then
trains from it exactly as from an offline cache (``CacheDataModule``).

The callback's state (which spool part holds which sequence, and the run's id) is checkpointed: a resumed teacher
run drops the parts written after the checkpoint and records those steps again, so a kill loses nothing and records
nothing twice. One process only (no DDP/FSDP recording yet: refused with one line).

Whose recording an output holds: every run draws a random run id, kept in its checkpoints (a resumed run keeps the
id of the run it resumes) and written to ``recording.json`` beside the cache. A finished cache in ``output`` is
kept only by the run with that id, i.e. a run resumed from a checkpoint of the recording run; any other run is
refused (unless ``overwrite``), even one of the same teacher shape, window and data. ``recorded_sequences.npy`` and
``recording.json`` are written atomically before the first shard of the cache, so a kill never leaves a complete
cache without its map; a complete cache without a matching map is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import lightning as L
import numpy as np
import torch

from pd_lightning.cache.format import (
    DEFAULT_SHARD_TOKENS,
    SCHEMA_VERSION,
    CacheError,
    CacheMismatchError,
    CacheSpec,
    check_schema,
    fsync_dir,
    read_layout,
    token_source_fingerprint,
    write_json_atomic,
)
from pd_lightning.cache.writer import CacheWriter
from pd_lightning.distill.processors import LogitsProcessor, TopPK, position_keys
from pd_lightning.distill.target import SparseTarget
from pd_lightning.online.collect import TargetCollector, _pad

SPOOL = ".recording"
SEQUENCES_FILE = "recorded_sequences.npy"
RECORDING_FILE = "recording.json"  # {"run_id", "sequences", "sequences_sha256"}: whose recording, and its map
_WRITE_SEQUENCES = 64  # sequences per CacheWriter.write when the spool becomes the cache


def _cache_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name == "index.json" or p.name.startswith(("shard-", "index-")))


class LogitRecorder(L.Callback):
    """Writes the teacher's training-time logits of a window of its run into a teacher cache.

    Args:
        output: the cache folder (refused when it holds another cache, unless ``overwrite``).
        processor: the truncation (default ``TopPK(0.95, 100)``), as ``pd-lightning predict --model.processor``.
        start_step: first optimizer step recorded (default 0).
        end_step: first optimizer step not recorded (default: the end of the run).
        last_tokens: record the last ``last_tokens`` training tokens of the run instead (rounded up to whole
            optimizer steps of ``batch_size x ranks x accumulation x seq_len`` tokens); excludes the step bounds.
        first_tokens: record the first ``first_tokens`` training tokens of the run (the paper's early "-L" window;
            rounded up to whole optimizer steps likewise); excludes the other bounds.
        power_gammas: gammas whose ``U_gamma = sum_v p_v^gamma`` is stored (default ``[0.5]``, as predict).
        shard_tokens: positions per cache shard (as ``--writer.shard_tokens``).
        overwrite: replace another cache found in ``output``.
        schema: the cache format written (3, the default, or 2; see ``pd-lightning predict --writer.schema``).
    """

    def __init__(
        self,
        output: str,
        processor: LogitsProcessor | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        last_tokens: int | None = None,
        first_tokens: int | None = None,
        power_gammas: list[float] | None = None,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        overwrite: bool = False,
        schema: int = SCHEMA_VERSION,
    ) -> None:
        self.schema = check_schema(schema)
        steps = start_step if start_step is not None else end_step
        bounds = (("start_step/end_step", steps), ("last_tokens", last_tokens), ("first_tokens", first_tokens))
        given = [name for name, value in bounds if value is not None]
        if len(given) > 1:
            raise ValueError(f"LogitRecorder: give one of start_step/end_step, last_tokens, first_tokens; got {given}")
        for name, value in (("last_tokens", last_tokens), ("first_tokens", first_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"LogitRecorder: {name} must be >= 1, got {value}")
        if shard_tokens < 1:
            raise ValueError(f"LogitRecorder: shard_tokens must be >= 1, got {shard_tokens}")
        self.output, self.overwrite, self.shard_tokens = Path(output), overwrite, shard_tokens
        self.processor = processor if processor is not None else TopPK()
        self.start_step, self.end_step, self.last_tokens = start_step, end_step, last_tokens
        self.first_tokens = first_tokens
        self.power_gammas = tuple(float(g) for g in ([0.5] if power_gammas is None else power_gammas))
        self.window: tuple[int, int] | None = None
        self._where: dict[int, tuple[int, int]] = {}  # sequence -> (spool part, row); the latest visit wins
        self._next_part = 0
        self._done = False
        self._collector: TargetCollector | None = None
        self.run_id = uuid.uuid4().hex  # this run's; a resumed run takes its checkpoint's (load_state_dict)

    @property
    def spool(self) -> Path:
        return self.output / SPOOL

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        where = f"LogitRecorder(output={str(self.output)!r})"
        if trainer.world_size > 1:
            raise ValueError(f"{where} records on one process only; run the teacher on one device to record")
        if not hasattr(trainer.datamodule, "tokens"):
            raise ValueError(
                f"{where} records a teacher pre-trained on a token file: use --data "
                f"pd_lightning.corpus.datamodule.TokenDataModule (got {type(trainer.datamodule).__name__})"
            )
        total = trainer.max_steps if trainer.max_steps > 0 else pl_module.total_steps
        tokens = self.last_tokens if self.last_tokens is not None else self.first_tokens
        if tokens is not None:
            name = "last_tokens" if self.last_tokens is not None else "first_tokens"
            data = trainer.datamodule
            per_step = data.batch_size * trainer.world_size * trainer.accumulate_grad_batches * data.seq_len
            steps = math.ceil(tokens / per_step)
            if steps > total:
                raise ValueError(
                    f"{where}: {name}={tokens} is {steps} optimizer steps of {per_step} tokens, "
                    f"more than the run's {total} steps (--trainer.max_steps); lower {name}"
                )
            start, end = (total - steps, total) if self.last_tokens is not None else (0, steps)
        else:
            start = 0 if self.start_step is None else self.start_step
            end = total if self.end_step is None else self.end_step
        if not 0 <= start < end <= total:
            raise ValueError(
                f"{where}: the recording window [start_step={start}, end_step={end}) lies outside the run's optimizer "
                f"steps [0, {total}) (--trainer.max_steps {total}); give 0 <= start_step < end_step <= {total}"
            )
        if self.output.exists() and not self.output.is_dir():
            raise FileExistsError(f"{where}: {str(self.output)!r} is a file, not a folder; name a folder")
        self.window = (start, end)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a checkpoint restore (load_state_dict ran): our own spool parts past the checkpoint are dropped.
        if self._done:
            return
        others = _cache_files(self.output)
        if others and not self.overwrite and self._own_cache(trainer, pl_module, others):
            self._done = True  # this run's recording finished after the checkpoint it resumes from: keep it
            print(f"LogitRecorder: {self.output} already holds this run's finished recording; not recording again")
            return
        if self.spool.is_dir():
            for part in self.spool.glob("part-*.pt"):
                if int(part.stem.split("-")[1]) >= self._next_part:
                    part.unlink()
        if self._next_part == 0 and self.spool.is_dir():  # a fresh run: a spool left by an earlier run is stale
            shutil.rmtree(self.spool)

    # ------------------------------------------------------------------------------------------------ recording
    def _recording(self, trainer: L.Trainer) -> bool:
        return not self._done and self.window is not None and self.window[0] <= trainer.global_step < self.window[1]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if not self._recording(trainer):
            return
        if "sequence_index" not in batch:
            raise ValueError("LogitRecorder needs batches that carry 'sequence_index' (TokenDataModule data)")
        length = batch["input_ids"].shape[1]
        keys = position_keys(batch["sequence_index"], length)
        self._collector = TargetCollector(self.processor, keys, self.power_gammas)
        pl_module.logit_observer = self._collector

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        collector, self._collector = self._collector, None
        pl_module.logit_observer = None
        if collector is not None:
            self._spool(batch, collector.target())
        if not self._done and self.window is not None and trainer.global_step >= self.window[1]:
            self._finish(trainer, pl_module)

    def _spool(self, batch: dict, target: SparseTarget) -> None:
        tokens = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1).to("cpu", torch.int32)  # (B, L + 1)
        part = {
            "tokens": tokens,
            "ids": target.ids.to("cpu", torch.int32),
            "logprobs": target.logprobs.float().cpu(),
            "std": target.std.float().cpu(),
            "entropy": target.entropy.float().cpu(),
            "tail": target.tail.float().cpu(),
            "power": torch.stack([target.power_sums[g] for g in self.power_gammas], -1).float().cpu()
            if self.power_gammas
            else torch.zeros(target.ids.shape[0], 0),
        }
        self.spool.mkdir(parents=True, exist_ok=True)
        n = self._next_part
        path = self.spool / f"part-{n:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(part, tmp)
        tmp.replace(path)
        for row, seq in enumerate(batch["sequence_index"].tolist()):
            self._where[int(seq)] = (n, row)  # a later visit replaces an earlier one
        self._next_part = n + 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._done and self._where:
            self._finish(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._collector = None
        pl_module.logit_observer = None

    # ------------------------------------------------------------------------------------------------ the cache
    def _identity(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[str, str]:
        """(token source fingerprint, the cache's teacher fingerprint): the run's teacher shape, window and data."""
        data = trainer.datamodule
        source = token_source_fingerprint(data.tokens.path, "train")
        identity = {"student": pl_module.student_config.shape(), "window": list(self.window), "source": source}
        return source, "online-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def _own_cache(self, trainer: L.Trainer, pl_module: L.LightningModule, others: list[str]) -> bool:
        """Whether ``output``'s cache is this run's finished recording (True) or its own unfinished one (False: a
        kill while the spool became the cache; the writer resumes it). Anything else is refused in one line."""
        where = f"LogitRecorder: output {str(self.output)!r}"
        refuse = "record into another folder, or set overwrite: true to replace it"
        try:
            layout, unreadable = read_layout(self.output, check_files=False), None
        except CacheError as err:
            layout, unreadable = None, err
        marker = self._read_marker()
        owner = None if marker is None else marker.get("run_id")
        if owner != self.run_id:
            whose = (f": the recording of another teacher run (run id {owner}), and this run (run id {self.run_id}) "
                     "does not resume from a checkpoint of that recording") if owner else ""  # fmt: skip
            raise CacheMismatchError(f"{where} already holds a teacher cache ({others[0]} ...){whose}; {refuse}")
        if unreadable is not None:
            raise CacheMismatchError(f"{where} holds this run's unfinished recording, but {unreadable}; set overwrite: "
                                     "true to record it again")  # fmt: skip
        if layout is not None and layout.spec.teacher_fingerprint != self._identity(trainer, pl_module)[1]:
            raise CacheMismatchError(
                f"{where} already holds a teacher cache ({others[0]} ...) of another teacher shape, window or data "
                f"than this run's; {refuse}"
            )
        if layout is None or not layout.complete:
            return False
        problem = self._map_problem(layout.spec, marker)
        if problem is not None:
            raise CacheMismatchError(
                f"{where} already holds this run's finished recording, but {problem}; set overwrite: true to record "
                "it again"
            )
        if not layout.final:  # killed after the last shard, before index.json: the writer's idempotent finish
            CacheWriter(self.output, layout.spec, schema=layout.schema).close()
        return True

    def _read_marker(self) -> dict | None:
        try:
            value = json.loads((self.output / RECORDING_FILE).read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _map_problem(self, spec: CacheSpec, marker: dict) -> str | None:
        """Why ``recorded_sequences.npy`` is not this cache's map, or None when it is."""
        path = self.output / SEQUENCES_FILE
        try:
            sequences = np.load(path)
        except (OSError, ValueError) as err:
            return f"its map back to the token file, {SEQUENCES_FILE}, is {'missing' if not path.exists() else err}"
        digest = hashlib.sha256(np.ascontiguousarray(sequences, dtype=np.int64).tobytes()).hexdigest()
        if (
            sequences.ndim != 1
            or len(sequences) != spec.num_sequences
            or digest != marker.get("sequences_sha256")
            or not spec.source_fingerprint.endswith(":" + digest[:16])
        ):
            return f"its map back to the token file, {SEQUENCES_FILE}, is not this cache's"
        return None

    def _write_map(self, sequences: np.ndarray) -> None:
        """``recorded_sequences.npy``, then ``recording.json`` (run id, map checksum): each atomically (a temporary
        file, fsynced, renamed), before the cache's first shard, so a complete cache always has its map."""
        self.output.mkdir(parents=True, exist_ok=True)
        path = self.output / SEQUENCES_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, sequences)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(self.output)
        digest = hashlib.sha256(sequences.tobytes()).hexdigest()
        write_json_atomic(
            self.output / RECORDING_FILE,
            {"run_id": self.run_id, "sequences": len(sequences), "sequences_sha256": digest},
        )

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The spool -> a cache of the distinct recorded sequences (ascending token-file order), then no spool."""
        data = trainer.datamodule
        sequences = np.array(sorted(self._where), dtype=np.int64)  # (M,)
        length = data.seq_len
        source, teacher_fp = self._identity(trainer, pl_module)
        picked = hashlib.sha256(sequences.tobytes()).hexdigest()[:16]  # the map's checksum (see _map_problem)
        spec = CacheSpec.for_processor(
            self.processor,
            vocab_size=pl_module.student_config.vocab_size,
            seq_len=length,
            num_sequences=len(sequences),
            teacher_fingerprint=teacher_fp,
            tokenizer_fingerprint=data.tokenizer_fingerprint,
            source_fingerprint=f"online:{source}:{picked}",
            shard_tokens=self.shard_tokens,
            power_gammas=self.power_gammas,
        )
        if self.overwrite:  # replace whatever cache output holds, also one of the same spec (another run's logits)
            for name in _cache_files(self.output):
                (self.output / name).unlink(missing_ok=True)
        writer = CacheWriter(self.output, spec, overwrite=self.overwrite, schema=self.schema)
        parts: dict[int, dict] = {}
        try:
            self._write_map(sequences)  # before any shard: no complete cache without its map
            for a in range(0, len(sequences), _WRITE_SEQUENCES):
                chunk = sequences[a : a + _WRITE_SEQUENCES]
                rows = [self._where[int(s)] for s in chunk]
                for n, _ in rows:
                    if n not in parts:
                        parts[n] = torch.load(self.spool / f"part-{n:08d}.pt", weights_only=True, mmap=True)
                writer.write(torch.arange(a, a + len(chunk)), *self._gather(parts, rows, length))
            path = writer.finalize()
        except BaseException:
            writer.close()
            raise
        shutil.rmtree(self.spool, ignore_errors=True)
        self._done, self._where = True, {}
        print(f"LogitRecorder: wrote {path} ({len(sequences)} sequences of steps {self.window[0]}-{self.window[1]})")

    def _gather(self, parts: dict[int, dict], rows: list[tuple[int, int]], length: int):
        tokens, fields = [], {k: [] for k in ("ids", "logprobs", "std", "entropy", "tail", "power")}
        for n, r in rows:
            p = parts[n]
            tokens.append(p["tokens"][r])
            pos = slice(r * length, (r + 1) * length)
            for k in fields:
                fields[k].append(p[k][pos])
        width = max(x.shape[1] for x in fields["ids"])
        power = torch.cat(fields["power"])  # (n, G)
        target = SparseTarget(
            ids=torch.cat([_pad(x, width, 0) for x in fields["ids"]]).long(),
            logprobs=torch.cat([_pad(x, width, -math.inf) for x in fields["logprobs"]]),
            std=torch.cat(fields["std"]),
            entropy=torch.cat(fields["entropy"]),
            tail=torch.cat(fields["tail"]),
            power_sums={g: power[:, i] for i, g in enumerate(self.power_gammas)} or None,
        )
        return torch.stack(tokens).long(), target

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        seqs = sorted(self._where)
        where = np.array([self._where[s] for s in seqs], dtype=np.int64).reshape(-1, 2)
        return {
            "sequences": torch.tensor(seqs, dtype=torch.int64),
            "where": torch.from_numpy(where),
            "next_part": self._next_part,
            "done": self._done,
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        self._where = {
            int(s): (int(n), int(r)) for s, (n, r) in zip(state["sequences"].tolist(), state["where"].tolist())
        }
        self._next_part, self._done = int(state["next_part"]), bool(state["done"])
        if state.get("run_id"):  # checkpoints before run ids had none: such a run is a new one to its output
            self.run_id = str(state["run_id"])
