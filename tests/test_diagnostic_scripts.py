"""The GPU diagnostic scripts on the CPU: ``scripts/gpu_syncs.py`` (torch's sync debug mode is
CUDA's, so a synchronising call is simulated by the warning that mode emits, from
``Tensor.tolist``) and ``scripts/step_profile.py`` (op counts from the CPU profiler); and
``scripts/heads_ab.py`` (the heads' gradient from the per-task passes or its own backward)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import gpu_syncs
import heads_ab
import step_profile


@pytest.mark.filterwarnings("ignore:called a synchronizing")  # the warm-up steps'
def test_each_wait_is_counted_and_named_by_the_line_of_mtopt(monkeypatch):
    tolist = torch.Tensor.tolist

    def warning_tolist(self):
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", warning_tolist)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda *a: None)
    per_step, _, origins = gpu_syncs.count_syncs(
        "unitary", "lenet", steps=2, warmup=1, device="cpu"
    )
    # the losses read for StepInfo, once per step, attributed to the engine's closure module
    # (on a GPU the innermost frame is that line itself; here it is the simulated tolist)
    closure = [o for o in origins if " via mtopt/engine/closure.py:" in o]
    assert len(closure) == 1, origins
    assert origins[closure[0]] == 2
    assert per_step == sum(origins.values()) / 2
    assert not any("warnings.py" in o for o in origins)


def test_the_profile_counts_each_contenders_ops(tmp_path):
    out = tmp_path / "profile.md"
    args = "--device cpu --workload mlp11 --contenders plain,upgrad#batched --steps 2 --warmup 1"
    assert step_profile.main([*args.split(), "--out", str(out)]) == 0
    lines = [line for line in out.read_text().splitlines() if line.startswith("- `")]
    assert [line.split("`")[1] for line in lines] == ["plain", "upgrad#batched"]
    counts = [float(line.split("aten::mse_loss_backward ")[1].split(" ")[0]) for line in lines]
    # the batched pass runs through the encoder only (mlp11 returns its features), and each
    # MSE head's row pass also takes its own gradient: differentiated once per step, as by a
    # plain backward, not once per row of K
    assert 0 < counts[0] == counts[1]


@pytest.mark.parametrize("script", [gpu_syncs, step_profile], ids=["gpu_syncs", "step_profile"])
def test_no_cuda_device_is_one_line_and_exit_2(script, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main([]) == 2
    assert capsys.readouterr().out.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--steps", "0"],
        ["--warmup", "-1"],
        ["--workload", "nope"],
        ["--contenders", "nope"],
        ["--contenders", "upgrad:c=1"],
        ["--contenders", "torchjd:Nope"],
    ],
)
def test_a_bad_input_is_one_line_and_exit_2(args, capsys):
    assert step_profile.main(["--device", "cpu", "--steps", "1", "--warmup", "0", *args]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("step_profile: ")


@pytest.mark.parametrize("args", [["--steps", "0"], ["--warmup", "-1"]])
def test_gpu_syncs_refuses_bad_counts_before_looking_for_a_device(args, capsys):
    assert gpu_syncs.main(args) == 2
    assert capsys.readouterr().out.startswith("gpu_syncs: --steps must be ≥ 1")


def test_heads_ab_times_both_variants_and_they_write_the_same_gradients(capsys):
    args = "--workload lenet --contenders upgrad,mgda#gramian --rounds 1 --steps 1"
    assert heads_ab.main(args.split()) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- `")]
    assert [line.split("`")[1] for line in lines] == ["upgrad", "mgda#gramian"]
    for line in lines:
        assert float(line.split("grad diff ")[1]) < 1e-5  # float32 rounding apart


@pytest.mark.parametrize(
    "args",
    [["--rounds", "0"], ["--steps", "0"], ["--workload", "nope"], ["--contenders", "plain"]],
)
def test_heads_ab_bad_input_is_one_line_and_exit_2(args, capsys):
    assert heads_ab.main(["--rounds", "1", "--steps", "1", *args]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("heads_ab: ")
