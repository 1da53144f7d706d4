"""Benchmark scoring with lm-eval-harness on local files.

* ``pd_lightning.eval.lm.StudentLM``: the lm-eval model (registered as ``pd-lightning``) over a student.
* ``pd_lightning.eval.tasks``: the seven tasks (``KNOWN_TASKS``), their data layout and checks, lm-eval YAMLs.
* ``pd_lightning.eval.runner.evaluate``: score a model on tasks from a data folder.

Submodules are imported on use (importing this package does not import lm-eval or transformers).
"""
