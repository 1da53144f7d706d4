"""The one way pd-lightning opens a ``.ckpt`` file: ``torch.load(..., weights_only=True)``, errors in one line.

Every command that reads a checkpoint (``fit``/``validate --ckpt_path``, ``predict --model.teacher X.ckpt``,
``export-hf --ckpt``) goes through ``load_checkpoint``, which

- refuses what is not a complete checkpoint before unpickling anything: a missing path, a folder, an empty file,
  a zip archive without its central directory (a truncated copy or an interrupted save), or no zip archive at all;
- unpickles with ``weights_only=True`` only, so a payload that names Python callables (``os.system``, any class)
  stays refused; the refusal is reported as such, and torch's advice to retry with ``weights_only=False`` never
  reaches the user (there is no flag that turns it off: ``--weights_only false`` is refused by the CLI);
- accepts an FSDP sharded checkpoint folder (``state_dict_type: sharded``) by checking its ``meta.pt``;
- memory-maps the tensors (``mmap=True``), so checking a multi-GB training checkpoint before Lightning loads it
  costs the unpickling of its small index, not a second copy of its weights;
- with ``kind``, checks it is a pd-lightning checkpoint (the student's hyperparameters and a ``state_dict``; for a
  resume also the loops and optimizer states Lightning needs).

Failures raise ``ValueError``/``FileNotFoundError`` whose message names the flag and the file, one line.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

# Lightning's special values of --ckpt_path that name no file.
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
# The file of an FSDP sharded checkpoint folder (``state_dict_type: sharded``) that holds everything but the
# weights and optimizer states (Lightning's ``_METADATA_FILENAME``).
SHARDED_META = "meta.pt"


def _first_sentence(message: str) -> str:
    """torch's message without its advice: the first line, cut before any mention of ``weights_only``."""
    line = next((s.strip() for s in str(message).splitlines() if s.strip()), "")
    line = re.split(r"(?i)weights_only|\. (?:In PyTorch|Please|Check|You can|If you)", line)[0].strip(" .:(")
    return line[:200]


def _zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable torch zip checkpoint, or None when its zip structure is whole."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with path.open("rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        return "not a PyTorch checkpoint (no zip archive: another format, or corrupt)"
    if not zipfile.is_zipfile(path):
        return (
            f"truncated or incomplete ({size:,} bytes; the zip archive's end is missing: an interrupted copy or save)"
        )
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"corrupt zip archive ({e})"
    if not any(n.endswith("data.pkl") for n in names):
        return "a zip archive, but not a PyTorch checkpoint (no data.pkl inside)"
    return None


def load_checkpoint(path: str | os.PathLike, flag: str, kind: str | None = None, mmap: bool = True) -> dict:
    """Load a checkpoint safely (``weights_only=True``) or raise one clear line naming ``flag`` and the file.

    Args:
        path: the ``.ckpt`` file.
        flag: the command-line flag that named it (``--ckpt_path``, ``--model.teacher``, ``--ckpt``).
        kind: None (any checkpoint dict), ``"student"`` (a pd-lightning checkpoint: student hyperparameters and
            weights), or ``"resume"`` (a student checkpoint with the training state ``fit`` resumes from).
        mmap: memory-map the tensors instead of reading them (see the module docstring).
    """
    p = Path(path)
    where = f"{flag} {str(p)!r}"
    if not p.exists():
        raise FileNotFoundError(f"{where}: no such file")
    if p.is_dir():
        if (p / SHARDED_META).is_file():  # an FSDP sharded checkpoint: its metadata (no weights) is checked
            meta = load_checkpoint(p / SHARDED_META, flag, kind=None, mmap=mmap)
            if kind is not None:
                check_student_checkpoint(meta, where, sharded=True)
            return meta
        raise ValueError(
            f"{where} is a folder, not a checkpoint file (give the .ckpt file inside it, or a sharded checkpoint "
            f"folder holding {SHARDED_META})"
        )
    try:
        problem = _zip_problem(p)
    except OSError as e:
        raise ValueError(f"{where}: cannot be read ({e.strerror or e})") from None
    if problem:
        raise ValueError(f"{where}: {problem}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it names {found.group(1)})" if found else ""
        raise ValueError(
            f"{where}: refused, it holds pickled Python objects, not only tensors and plain data{what}; "
            "pd-lightning never unpickles such objects (that can run any code); Lightning's own checkpoints hold none"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError) as e:
        raise ValueError(f"{where}: corrupt checkpoint ({_first_sentence(e) or type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{where}: not a Lightning checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    if kind is not None:
        check_student_checkpoint(ckpt, where, resume=kind == "resume")
    return ckpt


def check_student_checkpoint(ckpt: dict, where: str, resume: bool = False, sharded: bool = False) -> None:
    """Refuse a checkpoint that pd-lightning did not write (or, for ``resume``, one without training state).
    ``sharded``: ``ckpt`` is the metadata of a sharded folder, whose weights and optimizer states lie beside it."""
    student = (ckpt.get("hyper_parameters") or {}).get("student")
    if not isinstance(student, dict) or not (sharded or isinstance(ckpt.get("state_dict"), dict)):
        keys = ", ".join(sorted(map(str, ckpt))[:6]) or "nothing"
        raise ValueError(
            f"{where}: not a pd-lightning checkpoint (no student hyperparameters and state_dict; it holds {keys})"
        )
    if "pytorch-lightning_version" not in ckpt:
        raise ValueError(f"{where}: not a Lightning checkpoint (no 'pytorch-lightning_version')")
    if resume and ("loops" not in ckpt or not (sharded or "optimizer_states" in ckpt)):
        raise ValueError(
            f"{where}: holds only the weights (saved with save_weights_only), so training cannot resume from it; "
            "use it with `validate`, `export-hf` or as a teacher, or resume from a full checkpoint"
        )


def check_ckpt_path(ckpt_path: str | None, subcommand: str, fsdp: bool = False) -> None:
    """The check LightningCLI runs on ``--ckpt_path`` before building the trainer (nothing to do for None or
    Lightning's keywords ``last``/``best``/``hpc``/``registry``). ``fsdp``: the run uses an FSDP strategy, the only
    one that reads a sharded checkpoint folder."""
    if not ckpt_path or str(ckpt_path) in LIGHTNING_CKPT_KEYWORDS or "://" in str(ckpt_path):
        return
    load_checkpoint(ckpt_path, "--ckpt_path", kind="resume" if subcommand == "fit" else "student")
    if Path(ckpt_path).is_dir() and not fsdp:
        raise ValueError(
            f"--ckpt_path {str(ckpt_path)!r} is a sharded (FSDP) checkpoint folder: run with the FSDP strategy "
            f"(--config configs/trainer/fsdp.yaml) or consolidate it into one file first "
            f"(python -m lightning.pytorch.utilities.consolidate_checkpoint {ckpt_path})"
        )
