"""``pd-lightning export-hf``: a student checkpoint -> a Hugging Face ``LlamaForCausalLM`` folder.

    pd-lightning export-hf --ckpt run/last.ckpt --output hf/student [--tokenizer data/demo/tokenizer]
    pd-lightning export-hf run/last.ckpt hf/student [data/demo/tokenizer]        (the same, positional)

Everything is checked before anything is written (the checkpoint, the tokenizer and that it is the one the student
was trained with, the output path, the free space), and the folder is written under a hidden temporary name and
renamed at the end, so a failed export leaves nothing that blocks the rerun.
"""

from __future__ import annotations

import shutil

from pd_lightning.teacher import DTYPES

# flags of export_checkpoint that take a value (to tell positional arguments from flag values)
_VALUE_FLAGS = ("--ckpt", "--output", "--tokenizer", "--dtype", "--config", "-c")
_POSITIONAL = ("--ckpt", "--output", "--tokenizer")


def export_hf_argv(argv: list[str]) -> list[str]:
    """Accept ``export-hf CKPT OUTPUT [TOKENIZER]`` as well as the flag form: positional arguments become flags."""
    flags, positional = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-"):
            flags.append(a)
            if a in _VALUE_FLAGS and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            positional.append(a)
        i += 1
    if len(positional) > len(_POSITIONAL):
        raise ValueError(f"export-hf takes at most 3 positional arguments (CKPT OUTPUT [TOKENIZER]), got {positional}")
    given = {a.split("=", 1)[0] for a in flags}
    out = []
    for flag, value in zip(_POSITIONAL, positional):
        if flag in given:
            raise ValueError(f"export-hf: {flag} given twice (as {value!r} and as a flag)")
        out += [flag, value]
    return out + flags


def export_checkpoint(
    ckpt: str | None = None, output: str | None = None, tokenizer: str | None = None, dtype: str = "float32"
) -> None:
    """Export a student checkpoint to ``save_pretrained`` format (loadable with ``AutoModelForCausalLM``).

    Args:
        ckpt: the pd-lightning ``.ckpt`` file (required; also the first positional argument).
        output: the folder to write, refused if it exists and is not empty (required; also the second).
        tokenizer: tokenizer folder to save alongside (e.g. data/demo/tokenizer); it must be the one the student
            was trained with (its fingerprint is compared with the checkpoint's). Default: the tokenizer folder the
            checkpoint records (checkpoints written since it was recorded), if it still exists.
        dtype: float32, bfloat16 or float16.
    """
    from pd_lightning.corpus.tokenizer import load_tokenizer, tokenizer_fingerprint
    from pd_lightning.model.hf import export_hf
    from pd_lightning.paths import check_output_dir
    from pd_lightning.teacher import load_teacher

    if not ckpt:
        raise ValueError("export-hf: --ckpt is required (pd-lightning export-hf --ckpt X.ckpt --output FOLDER)")
    if not output:
        raise ValueError("export-hf: --output is required (pd-lightning export-hf --ckpt X.ckpt --output FOLDER)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out = check_output_dir(output, "--output")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--output {output!r} exists and is not empty; give a new folder or empty it")
    student = load_teacher(ckpt, flag="--ckpt")  # weights_only=True, one-line errors for a bad checkpoint
    if tokenizer is None and student.tokenizer_path:
        from pathlib import Path

        if Path(student.tokenizer_path).is_dir():
            tokenizer = student.tokenizer_path  # the one the checkpoint records; its fingerprint is checked below
            print(f"export-hf: saving the tokenizer the checkpoint records, {tokenizer} (--tokenizer to choose)")
        else:
            print(
                f"export-hf: warning: the checkpoint's tokenizer {student.tokenizer_path} no longer exists; the folder "
                "gets no tokenizer (give --tokenizer)"
            )
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, flag="--tokenizer")
        if student.tokenizer_fingerprint and tokenizer_fingerprint(tok) != student.tokenizer_fingerprint:
            raise ValueError(
                f"--tokenizer {tokenizer!r} is not the tokenizer the student was trained with (fingerprint "
                f"{tokenizer_fingerprint(tok)}, the checkpoint's is {student.tokenizer_fingerprint})"
            )
        if len(tok) > student.vocab_size:
            raise ValueError(
                f"--tokenizer {tokenizer!r} has {len(tok)} tokens, more than the student's vocabulary "
                f"({student.vocab_size})"
            )
    params = sum(p.numel() for p in student.model.parameters())
    need = params * DTYPES[dtype].itemsize
    anc = out.absolute()
    while not anc.exists():
        anc = anc.parent
    free = shutil.disk_usage(anc).free
    if free < need * 1.05:
        raise ValueError(
            f"--output {output!r}: the export needs ~{need / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB free"
        )
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # a previous export killed mid-write
    try:
        export_hf(student.model, tmp, tokenizer_dir=tokenizer, dtype=DTYPES[dtype], trained_seq_len=student.seq_len)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from pd_lightning.model.config import declared_max_length

    length = declared_max_length(student.seq_len)
    trained = f", trained on {student.seq_len:,}-token sequences" if student.seq_len else ""
    print(f"wrote {out} (LlamaForCausalLM, max_position_embeddings {length:,}{trained})")
