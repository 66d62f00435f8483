"""scripts/step_profile.py on the CPU (the GPU figures need a device): the report holds each
contender's line with the counted op, and the op counts follow the engine."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import step_profile


def test_the_report_counts_each_contenders_ops(tmp_path):
    out = tmp_path / "profile.md"
    args = "--device cpu --workload mlp11 --contenders plain,upgrad#batched --steps 2 --warmup 1"
    code = step_profile.main([*args.split(), "--out", str(out)])
    assert code == 0
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("- `")]
    assert [line.split("`")[1] for line in lines] == ["plain", "upgrad#batched"]
    counts = [float(line.split("aten::mse_loss_backward ")[1].split(" ")[0]) for line in lines]
    # the batched pass runs through the encoder only (mlp11 returns its features), so each MSE
    # head is differentiated twice per step (its row, its own gradient), not once per row of K
    assert 0 < counts[0] < counts[1] <= 2 * counts[0]


def test_no_cuda_device_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert step_profile.main([]) == 2
    assert capsys.readouterr().out.count("\n") == 1
