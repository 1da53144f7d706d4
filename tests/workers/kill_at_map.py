"""``pd-lightning`` that SIGKILLs itself the moment the logit recorder starts writing ``recorded_sequences.npy``.

Used by tests/test_online.py (issue item 7): the map back to the token file used to be written after the cache's
``index.json``, so a kill there left a complete cache without its map. SIGKILL cannot be caught: nothing of the
run's own code runs after it.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

_save = np.save


def _save_or_die(file, *args, **kwargs):
    name = file if isinstance(file, (str, os.PathLike)) else getattr(file, "name", "")
    if "recorded_sequences" in str(name):
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(file, *args, **kwargs)


np.save = _save_or_die

if __name__ == "__main__":
    from pd_lightning.cli import main

    main(sys.argv[1:])
