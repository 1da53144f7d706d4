"""``StudentLM``: lm-eval-harness's model interface over a pd-lightning student.

Registered with lm-eval as ``pd-lightning``. The student comes from a live ``Transformer`` / ``DistillationModule``,
a ``.ckpt`` file (``checkpoint=``) or an exported Hugging Face folder (``pretrained=``).

Requests are tokenised exactly as lm-eval's own ``hf`` model does (``TemplateLM._encode_pair``: trailing context
spaces move to the continuation; ``prefix_token_id`` = BOS, else EOS, for an empty context), so per-request
log-likelihoods equal the ``hf`` backend's on the exported folder (tests/test_eval_adapter.py: within 1e-4 in fp32).

* ``loglikelihood``: requests whose model input ``(context + continuation)[:-1]`` is the same share one row (the
  multiple-choice answers " A"/" B"/... of MMLU/C-Eval take one row per question); rows are sorted by length,
  longest first, right-padded, one forward per batch. Only the continuation positions go through ``lm_head`` and
  the log-softmax (in fp32), not the whole (batch x length x vocabulary) logits.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens, scored the same way.
* ``generate_until``: batched greedy decoding with the student's KV cache (``pd_lightning.model.generate``), left
  padding, stop strings and EOS; finished rows leave the batch.

Evaluation runs in ``eval()`` mode under ``torch.inference_mode``; the module's previous training mode is restored
after each call. Nothing here draws random numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from pd_lightning.model.config import StudentConfig, declared_max_length
from pd_lightning.model.generate import greedy_generate
from pd_lightning.model.transformer import KVCache, Transformer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_int(value, flag: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.startswith("auto"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be an integer, got {value!r}") from None


def _tokenizer_from_run_config(ckpt: Path) -> str | None:
    """The tokenizer folder of the token file named in the LightningCLI ``config.yaml`` saved beside the run."""
    import yaml

    from pd_lightning.corpus.prepare import TokenFile

    for folder in (ckpt.parent, ckpt.parent.parent):
        cfg_file = folder / "config.yaml"
        if not cfg_file.is_file():
            continue
        try:
            cfg = yaml.safe_load(cfg_file.read_text()) or {}
        except yaml.YAMLError:
            continue
        args = ((cfg.get("data") or {}).get("init_args")) or {}
        for key in ("path", "val_tokens"):
            value = args.get(key)
            if isinstance(value, str) and value.endswith((".h5", ".hdf5")) and Path(value).is_file():
                try:
                    return TokenFile(value).tokenizer_path
                except (FileNotFoundError, ValueError):
                    continue
    return None


def _hf_lengths(folder: str) -> dict:
    """An exported folder's maximum length, resolved exactly as lm-eval's ``hf`` model resolves it (the config's
    ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``, else 2048), and the training length ``export-hf``
    records beside it (``pd_lightning_seq_len``) when there is one."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    out = {"max_length": int(resolve_max_length(config, None, default=2048))}
    seq_len = getattr(config, "pd_lightning_seq_len", None)
    if seq_len:
        out["seq_len"] = int(seq_len)
    return out


def load_student_checkpoint(path: str | os.PathLike, flag: str = "checkpoint") -> tuple[Transformer, dict]:
    """The student ``Transformer`` of a pd-lightning ``.ckpt`` and the checkpoint's ``pd_lightning`` record
    (``tokenizer_fingerprint``, ``seq_len``, and ``tokenizer_path`` when known)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag}: checkpoint {str(p)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{flag}: {str(p)!r} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    student = (ckpt.get("hyper_parameters") or {}).get("student") if isinstance(ckpt, dict) else None
    if isinstance(student, StudentConfig):
        student = student.asdict()
    if not isinstance(student, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{flag}: {str(p)!r} is not a pd-lightning checkpoint (no student hyperparameters)")
    model = Transformer(StudentConfig(**student))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    record = dict(ckpt.get("pd_lightning") or {})
    if not record.get("tokenizer_path"):
        found = _tokenizer_from_run_config(p)
        if found:
            record["tokenizer_path"] = found
    return model.eval(), record


def check_tokenizer(tokenizer, model: Transformer, fingerprint: str | None, source: str) -> None:
    """Refuse a tokenizer that is not the one the student was trained with: a different fingerprint (vocabulary,
    merges, normaliser, pre-tokeniser) than ``fingerprint``, or more ids than the student's vocabulary."""
    from pd_lightning.corpus.tokenizer import tokenizer_fingerprint

    if fingerprint:
        got = tokenizer_fingerprint(tokenizer)
        if got != fingerprint:
            raise ValueError(
                f"tokenizer: {source} was trained with tokenizer {fingerprint}, the given tokenizer is {got}; "
                "pass the tokenizer folder the student was trained with"
            )
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer: it has {len(tokenizer)} ids but {source} has a vocabulary of {model.config.vocab_size}"
        )


@register_model("pd-lightning", "pd_lightning")
class StudentLM(TemplateLM):
    """lm-eval model over a pd-lightning student.

    Args:
        model: the student (or give ``checkpoint`` / ``pretrained``).
        tokenizer: a tokenizer object or a local tokenizer folder. With ``checkpoint`` it defaults to the
            tokenizer of the token file the run trained on (found through the run's ``config.yaml``); with
            ``pretrained`` to the folder's own. Refused when its fingerprint differs from the checkpoint's.
        batch_size: rows per forward (lm-eval's ``--batch_size``; ``auto`` means 8).
        max_length: longest input in tokens; longer inputs are cut from the left as lm-eval does. Default: the
            student's declared length (``declared_max_length``: 4,096, or the training ``seq_len`` when longer),
            which ``export-hf`` writes as ``max_position_embeddings``; with ``pretrained`` the folder's own length,
            resolved as lm-eval's ``hf`` model resolves it. So every path scores with the length lm-eval's ``hf``
            model uses on the export.
        trained_length: the sequence length the student was trained at (default: the checkpoint's / export's
            record); requests longer than it are counted in ``request_lengths`` / ``length_summary``.
        device: where to run (default: where the model is; ``cuda`` when loading and a GPU is present). A live
            model is moved there.
        checkpoint: a pd-lightning ``.ckpt`` file.
        pretrained: an exported Hugging Face folder (``pd-lightning export-hf``).
        dtype: float32 (default), bfloat16 or float16 when loading (a live model keeps its own).
        max_gen_toks: default cap on generated tokens (a task's ``max_gen_toks`` wins).
        progress: show progress bars.
    """

    def __init__(
        self,
        model: Transformer | None = None,
        tokenizer=None,
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        device: str | torch.device | None = None,
        *,
        checkpoint: str | None = None,
        pretrained: str | None = None,
        dtype: str | None = None,
        max_gen_toks: int | str = 256,
        progress: bool | str = True,
        trained_length: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        from pd_lightning.corpus.tokenizer import load_tokenizer

        ignored = sorted(set(kwargs) - {"max_batch_size", "trust_remote_code", "parallelize"})
        if ignored:
            log.warning("StudentLM ignores the arguments %s", ", ".join(ignored))
        if sum(x is not None for x in (model, checkpoint, pretrained)) != 1:
            raise ValueError("StudentLM: give exactly one of model, checkpoint=<.ckpt> or pretrained=<HF folder>")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        if dtype is not None and model is not None:
            raise ValueError("dtype applies when loading (checkpoint= / pretrained=); a live model keeps its dtype")
        record: dict = {}
        source = "the student"
        if checkpoint is not None:
            model, record = load_student_checkpoint(checkpoint)
            source = f"checkpoint {checkpoint!r}"
            if tokenizer is None:
                tokenizer = record.get("tokenizer_path")
                if tokenizer is None:
                    raise ValueError(
                        f"tokenizer: checkpoint {checkpoint!r} does not say where its tokenizer is; "
                        "pass tokenizer=<folder>"
                    )
        elif pretrained is not None:
            from pd_lightning.corpus.tokenizer import tokenizer_fingerprint
            from pd_lightning.model.hf import import_hf

            if not Path(pretrained, "config.json").is_file():
                raise FileNotFoundError(f"pretrained: {pretrained!r} is not a Hugging Face model folder")
            model = import_hf(pretrained)
            source = f"model folder {pretrained!r}"
            record.update(_hf_lengths(pretrained))
            own = pretrained if any(Path(pretrained, f).is_file() for f in ("tokenizer.json",)) else None
            if tokenizer is None:
                if own is None:
                    raise ValueError(f"tokenizer: {pretrained!r} holds no tokenizer; pass tokenizer=<folder>")
                tokenizer = own
            elif own is not None:
                record["tokenizer_fingerprint"] = tokenizer_fingerprint(load_tokenizer(own, flag="pretrained"))
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer(tokenizer, flag="tokenizer")
        if tokenizer is None:
            raise ValueError("StudentLM: a tokenizer is required")
        check_tokenizer(tokenizer, model, record.get("tokenizer_fingerprint"), source)

        if device is None and (checkpoint or pretrained) and torch.cuda.is_available():
            device = "cuda"
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but CUDA is not available; using the CPU", device)  # as lm-eval's hf
            device = "cpu"
        if device is not None:
            model = model.to(device)
        if dtype is not None:
            model = model.to(_DTYPES[dtype])
        self.model = model
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = _as_int(batch_size, "batch_size") or 8
        self._max_length = _as_int(max_length, "max_length") or int(
            record.get("max_length") or declared_max_length(record.get("seq_len") or trained_length)
        )
        self.trained_length = trained_length if trained_length is not None else record.get("seq_len")
        # (tokens before any cut, tokens the model saw) per request, in the order of the requests given
        self.request_lengths: list[tuple[int, int]] = []
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks") or 256
        self.progress = str(progress).lower() not in ("false", "0", "no")
        self.record = record

    # ---- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, tokenizer=None, **kw) -> StudentLM:
        return cls(checkpoint=str(path), tokenizer=tokenizer, **kw)

    @classmethod
    def from_hf(cls, folder: str | os.PathLike, **kw) -> StudentLM:
        return cls(pretrained=str(folder), **kw)

    @classmethod
    def from_module(cls, module, tokenizer, **kw) -> StudentLM:
        """Over a live ``DistillationModule`` (its ``model`` is used in place: no copy, same device/dtype)."""
        fingerprint = None
        trainer = getattr(module, "_trainer", None)
        data = getattr(trainer, "datamodule", None) if trainer is not None else None
        if data is not None and hasattr(data, "tokenizer_fingerprint"):
            fingerprint = data.tokenizer_fingerprint
        seq_len = getattr(data, "seq_len", None) if data is not None else None
        if seq_len and kw.get("trained_length") is None:
            kw["trained_length"] = int(seq_len)
        lm = cls(model=module.model, tokenizer=tokenizer, **kw)
        if fingerprint:
            check_tokenizer(lm.tokenizer, lm.model, fingerprint, "the module's training data")
        return lm

    # ---- lm-eval properties -------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "student").replace("/", "__")

    def get_model_info(self) -> dict:
        cfg = self.model.config
        return {"model_num_parameters": cfg.num_parameters(), "model_dtype": str(next(self.model.parameters()).dtype)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As lm-eval's hf model: the tokenizer's default special tokens unless told otherwise.
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---- evaluation mode ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _bar(self, total: int, desc: str, disable: bool = False):
        return tqdm(total=total, desc=desc, disable=disable or not self.progress or self.rank != 0)

    # ---- log-likelihood -----------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # TemplateLM tokenises (lm-eval's _encode_pair) and calls _loglikelihood_tokens.
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation tokens | preceding tokens) and whether each was the argmax."""
        L = self.max_length
        # One row per distinct model input; a request reads its continuation positions from that row.
        rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError("loglikelihood: empty continuation after tokenisation")
            full = len(context) + len(continuation) - 1
            self.request_lengths.append((full, min(full, L)))
            whole = (context + continuation)[-(L + 1) :]
            cont = continuation[-L:]
            rows.setdefault(tuple(whole[:-1]), []).append((i, cont))
        # Rows that differ only after a long common prefix (the choices of one question: C3's, HellaSwag's endings)
        # run the prefix once into a KV cache and their short suffixes against it (``_score_shared``).
        groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for key, reqs in rows.items():
            prefix = key[: len(key) - max(len(cont) for _, cont in reqs)]
            groups.setdefault(prefix, []).append(key)
        shared = {p: keys for p, keys in groups.items() if len(keys) > 1 and len(p) >= self.shared_prefix_min}
        plain = [key for p, keys in groups.items() if p not in shared for key in keys]
        order = sorted(plain, key=lambda k: (-len(k), k))  # longest first, as lm-eval does
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = self._bar(len(requests), "loglikelihood", disable_tqdm)
        with self._eval_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)
                for b, key in enumerate(chunk):
                    batch[b, : len(key)] = torch.tensor(key)
                hidden = self.model(batch.to(self.device), return_hidden=True)  # (B, T, C)
                entries = [(b, len(key), rows[key]) for b, key in enumerate(chunk)]
                self._score_positions(hidden, entries, requests, results, bar)
            for prefix in sorted(shared, key=lambda p: (-len(p), p)):
                self._score_shared(prefix, shared[prefix], rows, requests, results, bar)
        bar.close()
        return results  # type: ignore[return-value]

    # A prefix this long (in tokens) shared by two or more rows is run once (below it, batching whole rows is as fast).
    shared_prefix_min = 256

    def _score_shared(self, prefix: tuple[int, ...], keys: list[tuple[int, ...]], rows, requests, results, bar):
        """The rows ``keys`` all start with ``prefix``: run it once (batch 1) into a ``KVCache``, copy the cache to
        each row and run the rows' suffixes against it, ``batch_size`` rows at a time (right-padded; the causal mask
        keeps padding out of every real position). Exact: each suffix position sees the same keys and values as in a
        forward of the whole row, up to float rounding."""
        p = len(prefix)
        longest = max(len(k) for k in keys)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.config, 1, longest, dtype, self.device)
        hidden = self.model(torch.tensor([prefix], device=self.device), return_hidden=True, cache=cache)
        # Every forward here is followed by one call of the output head (as in ``_score_positions`` and generation):
        # under FSDP2 the head is its own sharded unit, and ranks in lockstep (``ShardedLM``) must call it equally
        # often (a rank's dummy forward calls it once). One position, so it costs nothing.
        self.model.lm_head(hidden[:, -1])
        keys = sorted(keys, key=lambda k: (-len(k), k))
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            rows_cache = cache.copies(len(chunk))
            batch = torch.zeros(len(chunk), len(chunk[0]) - p, dtype=torch.long)
            for b, key in enumerate(chunk):
                batch[b, : len(key) - p] = torch.tensor(key[p:])
            hidden = self.model(batch.to(self.device), return_hidden=True, cache=rows_cache)  # (B, T - p, C)
            entries = [(b, len(key) - p, rows[key]) for b, key in enumerate(chunk)]
            self._score_positions(hidden, entries, requests, results, bar)

    def _score_positions(self, hidden, entries, requests, results, bar) -> None:
        """``entries``: (batch row, length n of that row in ``hidden``, its requests); a request with continuation
        ``cont`` reads positions n - len(cont) .. n - 1. The head and the log-softmax run on those positions only."""
        pick_b, pick_t, targets, owners = [], [], [], []
        for b, n, reqs in entries:
            for i, cont in reqs:
                c = len(cont)
                pick_b += [b] * c
                pick_t += range(n - c, n)
                targets += cont
                owners.append((i, c))
        dev = hidden.device
        h = hidden[torch.tensor(pick_b, device=dev), torch.tensor(pick_t, device=dev)]  # continuation rows
        logp = F.log_softmax(self.model.lm_head(h).float(), dim=-1)
        tgt = torch.tensor(targets, device=logp.device)
        token_lp = logp.gather(1, tgt[:, None]).squeeze(1).tolist()
        greedy = (logp.argmax(dim=-1) == tgt).tolist()
        pos = 0
        for i, c in owners:
            results[i] = (float(sum(token_lp[pos : pos + c])), bool(all(greedy[pos : pos + c])))
            pos += c
            req_str = requests[i][0]
            if req_str is not None:
                self.cache_hook.add_partial("loglikelihood", req_str, results[i])
            bar.update(1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(r)
        before = len(self.request_lengths)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        del self.request_lengths[before:]  # one entry per document, not per window
        for (string,) in (req.args for req in requests):
            n = len(self.tok_encode(string))
            self.request_lengths.append((n, min(n, self.max_length)))
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations until a stop string, EOS or ``max_gen_toks``; grouped by generation settings, each
        group sorted by prompt length (longest first) and decoded in batches with the KV cache."""
        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results: list[str | None] = [None] * len(requests)
        lengths: list[tuple[int, int]] = [(0, 0)] * len(requests)
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        with self._eval_mode():
            for idx in groups.values():
                kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
                if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                    raise ValueError("generate_until: only greedy decoding is supported (do_sample=false)")
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = int(kwargs.pop("max_gen_toks"))
                keep = self.max_length - max_gen  # room for the generated tokens, as lm-eval's hf model leaves
                if keep <= 0:
                    raise ValueError(
                        f"generate_until: max_gen_toks {max_gen} leaves no room for the prompt in the model's maximum "
                        f"length {self.max_length}; lower max_gen_toks (validate: --eval.max_gen_toks) below it"
                    )
                encoded = {}
                for i in idx:
                    whole = self.tok_encode(requests[i].args[0])
                    encoded[i] = whole[-keep:]
                    lengths[i] = (len(whole), len(encoded[i]))
                idx = sorted(idx, key=lambda i: (-len(encoded[i]), requests[i].args[0]))
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start : start + self.batch_size]
                    gen = greedy_generate(
                        self.model,
                        [encoded[i] for i in chunk],
                        max_gen,
                        eos_id=self.eot_token_id,
                        stop=self._stop_check(until),
                        pad_id=self.tokenizer.pad_token_id or 0,
                    )
                    for i, toks in zip(chunk, gen):
                        text = postprocess_generated_text(self.tok_decode(toks), until, None)
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                        bar.update(1)
        bar.close()
        self.request_lengths.extend(lengths)
        return results  # type: ignore[return-value]

    def _stop_check(self, until: list[str]):
        """``stop(row, generated)``: whether a stop string occurs in the decoded tail of the generated tokens."""
        stops = [s for s in until if s]
        if not stops:
            return None
        # A character is at most 4 bytes, and byte-level tokens hold at least one byte.
        tail = 4 * max(len(s) for s in stops) + 4

        def stop(row: int, generated: list[int]) -> bool:
            text = self.tokenizer.decode(generated[-tail:], skip_special_tokens=False)
            return any(s in text for s in stops)

        return stop
