"""Online logits: the cost of the logit recorder in a teacher's training step, and of a teacher in the step.

    .venv/bin/python benchmarks/recorder_overhead.py [--vocab 32000 --hidden 256 --layers 4 --seq 256 --batch 2]

1. ``ratio``: the teacher's full training step (forward, fused LM loss, backward, AdamW) with the recorder's work
   -- ``TargetCollector`` reading each loss chunk's logits through ``lm_kd_loss(observe=...)`` and running TopPK(0.95,
   100) + the full-distribution statistics on it, then ``LogitRecorder._spool`` writing the batch's sparse target to
   disk -- divided by the same step without it. Goal <= 1.10.
2. ``in_step_ratio``: a student step with a frozen teacher in it (``DistillationModule._online_target`` + the KD
   step) divided by the sum of the teacher's target computation alone and the student's KD step alone (given the
   same target), all three timed in the same repetition. Goal <= 1.05 (nothing wasted beyond the two passes).

Variants run interleaved (``--reps`` >= 7 repetitions after one warm-up each); medians, the min/max of the paired
ratios and the torch thread count are printed; the last line is
``RESULT ratio=... in_step_ratio=... cpu_ratio=... cpu_in_step_ratio=...`` (wall-clock ratios first).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from pd_lightning.distill.losses import NLL
from pd_lightning.distill.processors import TopPK, position_keys
from pd_lightning.distill.schedules import Constant
from pd_lightning.model.config import StudentConfig
from pd_lightning.module import DistillationModule
from pd_lightning.online.collect import TargetCollector
from pd_lightning.online.in_step import FrozenTeacher
from pd_lightning.online.recorder import LogitRecorder
from pd_lightning.teacher import Teacher


def module(cfg: StudentConfig, kd: bool) -> tuple[DistillationModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = DistillationModule(cfg, loss=NLL() if kd else None, alpha=Constant(1.0) if kd else None, max_steps=1000)
    return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): the CPU time is robust to other processes on a shared machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def train(m: DistillationModule, opt, loss) -> None:
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--student_hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    teacher_cfg = StudentConfig(preset="tiny", vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers,
                                intermediate_size=int(args.hidden * 2.75))  # fmt: skip
    student_cfg = StudentConfig(preset="tiny", vocab_size=args.vocab, n_embd=args.student_hidden, n_layer=2,
                                intermediate_size=int(args.student_hidden * 2.75))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "sequence_index": torch.arange(args.batch)}
    processor, gammas = TopPK(0.95, 100), (0.5,)

    # 1. teacher step with / without the recorder
    plain, opt_plain = module(teacher_cfg, kd=False)
    rec, opt_rec = module(teacher_cfg, kd=False)
    spool = tempfile.TemporaryDirectory()
    recorder = LogitRecorder(spool.name, processor=processor)

    def step_plain() -> None:
        train(plain, opt_plain, plain._loss(batch, 0.0).total)

    def step_recorded() -> None:
        collector = TargetCollector(processor, position_keys(batch["sequence_index"], args.seq), gammas)
        train(rec, opt_rec, rec._loss(batch, 0.0, observe=collector).total)
        recorder._spool(batch, collector.target())

    # 2. in-step teacher vs (teacher targets alone + student step alone)
    teacher_model, _ = module(teacher_cfg, kd=False)
    frozen = FrozenTeacher.__new__(FrozenTeacher)  # the loaded-teacher wrapper, around an in-memory model
    frozen.path, frozen.teacher = (
        "bench",
        Teacher(teacher_model.model.requires_grad_(False).eval(), args.vocab, "b", None),
    )
    in_step, opt_in = module(student_cfg, kd=True)
    in_step.frozen_teacher, in_step.teacher_processor = frozen, processor
    alone, opt_alone = module(student_cfg, kd=True)
    held = {}

    def teacher_only() -> None:
        held["target"] = frozen.targets(batch, processor, gammas)

    def student_only() -> None:
        train(alone, opt_alone, alone._loss(batch, 1.0, target=held["target"]).total)

    def step_in_step() -> None:
        target, _ = in_step._online_target(batch, 1.0)
        train(in_step, opt_in, in_step._loss(batch, 1.0, target=target).total)

    for fn in (step_plain, step_recorded, teacher_only, student_only, step_in_step):  # warm-up
        fn()
    runs = {"plain": step_plain, "recorded": step_recorded, "teacher": teacher_only, "student": student_only,
            "in_step": step_in_step}  # fmt: skip
    both = {k: [] for k in runs}
    for _ in range(args.reps):
        for k, fn in runs.items():
            both[k].append(timed(fn))
    print(f"torch threads {torch.get_num_threads()}; teacher H={args.hidden} L={args.layers}, student "
          f"H={args.student_hidden} L=2, V={args.vocab}, {args.batch}x{args.seq} tokens, {args.reps} reps")  # fmt: skip
    result = {}
    for clock, c in (("CPU", 1), ("wall", 0)):  # the wall-clock figures are printed last and give the RESULT
        t = {k: [x[c] for x in v] for k, v in both.items()}
        ratios = [r / p for r, p in zip(t["recorded"], t["plain"])]
        in_ratios = [i / (a + b) for i, a, b in zip(t["in_step"], t["teacher"], t["student"])]
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        print(
            f"[{clock} time] teacher step: plain {med['plain']:.1f} ms, with recorder {med['recorded']:.1f} ms; "
            f"ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
        )
        print(f"[{clock} time] in-step: teacher targets {med['teacher']:.1f} ms + student step {med['student']:.1f} "
              f"ms vs in-step {med['in_step']:.1f} ms; ratio median {statistics.median(in_ratios):.3f} "
              f"(min {min(in_ratios):.3f}, max {max(in_ratios):.3f})")  # fmt: skip
        result[clock] = (statistics.median(ratios), statistics.median(in_ratios))
    (wall, in_wall), (cpu, in_cpu) = result["wall"], result["CPU"]
    print(f"RESULT ratio={wall:.3f} in_step_ratio={in_wall:.3f} cpu_ratio={cpu:.3f} cpu_in_step_ratio={in_cpu:.3f}")
    spool.cleanup()


if __name__ == "__main__":
    main()
