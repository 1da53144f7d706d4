"""The ``pd-lightning`` command.

    pd-lightning fit|validate|test --config ...   train / score the student (LightningCLI, DistillationModule)
    pd-lightning prepare ...                      text -> packed token file (HDF5)

Heavy imports (Lightning, transformers) happen inside the branch that needs them, so ``prepare`` starts fast.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def _function_cli(fn, args: list[str]) -> None:
    from jsonargparse import CLI

    CLI(fn, args=args)


def main(argv: list[str] | None = None) -> None:
    from_python = argv is not None
    argv = list(argv) if from_python else sys.argv[1:]
    command = argv[0] if argv else ""
    try:
        if command == "prepare":
            from pd_lightning.data.corpus import prepare

            _function_cli(prepare, argv[1:])
        else:
            from pd_lightning.lightning_cli import train_cli

            train_cli(argv if from_python else None)
    except USER_ERRORS as e:
        # Bad input: one clear line naming the flag or file, non-zero exit, no traceback.
        print(f"pd-lightning: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
