"""``pd-lightning export-hf``: a student checkpoint -> a Hugging Face ``LlamaForCausalLM`` folder."""

from __future__ import annotations

from pathlib import Path

from pd_lightning.teacher import DTYPES


def export_checkpoint(ckpt: str, output: str, tokenizer: str | None = None, dtype: str = "float32") -> None:
    """Export a student checkpoint to ``save_pretrained`` format (loadable with ``AutoModelForCausalLM``).

    Args:
        ckpt: the pd-lightning ``.ckpt`` file.
        output: the folder to write (refused if it exists and is not empty).
        tokenizer: tokenizer folder to save alongside (e.g. data/demo/tokenizer).
        dtype: float32, bfloat16 or float16.
    """
    from pd_lightning.model.hf import export_hf
    from pd_lightning.teacher import load_teacher

    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--output {output!r} exists and is not empty")
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"--ckpt {ckpt!r} does not exist")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    student = load_teacher(ckpt).model  # a pd-lightning checkpoint loads as the plain Transformer
    export_hf(student, out, tokenizer_dir=tokenizer, dtype=DTYPES[dtype])
    print(f"wrote {out} (LlamaForCausalLM)")
