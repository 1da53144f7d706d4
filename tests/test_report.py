"""`pd-lightning report` on a hand-made results table (no training): paired Δ% and its std over seeds against a
hand computation, every figure family drawn, a figure family left out when it has fewer than two configs, the
student-size figure when two presets ran, and bad tables refused in one line."""

from __future__ import annotations

import json
import statistics
import struct

import pytest

from pd_lightning.cli import main
from pd_lightning.report import PAPER_DELTA

LOSSES = {  # (name, seed) -> held-out loss
    ("lm-baseline", 1): 5.50, ("lm-baseline", 2): 5.40,
    ("table4-alpha-0.5", 1): 5.45, ("table4-alpha-0.5", 2): 5.38,
    ("table4-alpha-0.9", 1): 5.30, ("table4-alpha-0.9", 2): 5.35,
    ("table8-top-0.95-10", 1): 5.44, ("table8-top-0.95-10", 2): 5.39,
    ("table8-top-0.95-50", 1): 5.41, ("table8-top-0.95-50", 2): 5.33,
    ("table5-kld", 1): 5.47, ("table5-mse", 1): 5.60,
}  # fmt: skip


def _row(name: str, seed: int, loss: float, student: str = "tiny") -> dict:
    k = int(name.rsplit("-", 1)[1]) if name.startswith("table8-") else 100
    return {
        "name": name, "seed": seed, "student": student, "val_loss": loss, "p": 0.95, "k": k,
        "cache_bytes_per_token": 30.0 + 4.0 * k, "tokens": 614400, "wall_s": 10.0, "baseline": name == "lm-baseline",
        "val_curve": [[50, loss + 1.0], [100, loss]],
    }  # fmt: skip


def _write(path, rows) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _png(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_delta_and_figures(tmp_path, capsys):
    _write(tmp_path, [_row(n, s, v) for (n, s), v in LOSSES.items()])
    main(["report", str(tmp_path)])
    printed = capsys.readouterr().out
    for name in ("table4-alpha-0.5", "table4-alpha-0.9", "table8-top-0.95-50"):
        deltas = [100 * (LOSSES[("lm-baseline", s)] - LOSSES[(name, s)]) / LOSSES[("lm-baseline", s)] for s in (1, 2)]
        line = next(x for x in printed.splitlines() if x.startswith(f"| {name} "))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert f"{statistics.fmean(deltas):+.2f}" in cells and f"{statistics.stdev(deltas):.2f}" in cells
        assert f"{PAPER_DELTA[name]:+.1f}" in cells
    kld = next(x for x in printed.splitlines() if x.startswith("| table5-kld "))
    assert f"{100 * (5.50 - 5.47) / 5.50:+.2f}" in kld  # one seed: paired with seed 1's baseline only
    out = tmp_path / "report"
    for png in ("curves.png", "delta_all.png", "alpha.png", "top_k.png", "loss_schedule.png", "cache_bytes.png"):
        w, h = _png(out / png)
        assert w > 500 and h > 300, png
    for absent in ("tau.png", "top_p.png", "adaptive_tau.png", "student_size.png"):  # < 2 configs of that family
        assert not (out / absent).exists()
    md = (out / "report.md").read_text()
    assert "![alpha](alpha.png)" in md and "| lm-baseline | tiny | 2 |" in md


def test_report_student_size(tmp_path):
    rows = []
    for student, shift in (("tiny", 0.0), ("demo", -0.5)):
        for name in ("lm-baseline", "table4-alpha-0.9"):
            rows.append(_row(name, 1, LOSSES[(name, 1)] + shift, student))
    _write(tmp_path, rows)
    main(["report", str(tmp_path), "--output", str(tmp_path / "figs")])
    _png(tmp_path / "figs" / "student_size.png")


@pytest.mark.parametrize(
    "content, message",
    [("", "holds no runs"), ('{"name": "a"}\nnot json\n', "results.jsonl line 2 is not JSON")],
)
def test_report_bad_table(tmp_path, capsys, content, message):
    (tmp_path / "results.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "report").exists()


def test_report_shows_bits_per_byte_and_its_paired_delta(tmp_path, capsys):
    """Rows with ``val_bpb`` (issue 20): the mean bits per byte over seeds and the paired Δ% of bits per byte against
    a hand computation; a table without it shows neither column."""
    bpb = {("lm-baseline", 1): 1.60, ("lm-baseline", 2): 1.50, ("kd", 1): 1.52, ("kd", 2): 1.47}
    _write(tmp_path, [{**_row(n, s, 5.0), "val_bpb": v} for (n, s), v in bpb.items()])
    main(["report", str(tmp_path)])
    printed = capsys.readouterr().out
    header = [c.strip() for c in printed.splitlines()[0].strip("|").split("|")]
    line = next(x for x in printed.splitlines() if x.startswith("| kd "))
    cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
    deltas = [100 * (1.60 - 1.52) / 1.60, 100 * (1.50 - 1.47) / 1.50]
    assert cells["bits/byte"] == f"{(1.52 + 1.47) / 2:.4f}"
    assert cells["Δ% bits/byte"] == f"{statistics.fmean(deltas):+.2f}"
    _write(tmp_path / "old", [_row(n, s, 5.0) for (n, s) in bpb])
    main(["report", str(tmp_path / "old")])
    assert "bits/byte" not in capsys.readouterr().out
