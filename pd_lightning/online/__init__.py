"""Online logits (METHOD.md, Table 6): a teacher's logits taken while it trains, or computed inside the student's
training step.

- ``recorder.LogitRecorder``: a callback for ``pd-lightning fit`` of a teacher that records the training-time
  logits of a window of its run into a teacher cache (the offline format), from the same loss pass.
- ``DistillationModule(teacher=...)``: a frozen teacher (HF folder or pd-lightning checkpoint) in the training step.
- ``DistillationModule(co_train=...)``: teacher and student pre-trained together from scratch.
"""
