"""scripts/gpu_syncs.py on the CPU: torch's sync debug mode is CUDA's, so a synchronising call is
simulated by a warning from ``Tensor.tolist`` (what the mode emits on a GPU), and the script must
count it once per call and name the line of mtopt that made it."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import gpu_syncs


@pytest.mark.filterwarnings("ignore:called a synchronizing")  # the warm-up steps'
def test_each_wait_is_counted_and_named_by_the_line_of_mtopt(monkeypatch):
    tolist = torch.Tensor.tolist

    def warning_tolist(self):
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", warning_tolist)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda *a: None)
    per_step, ms, origins = gpu_syncs.count_syncs(
        "unitary", "lenet", steps=2, warmup=1, device="cpu"
    )
    assert ms > 0
    # the losses read for StepInfo, once per step, attributed to the engine's closure module
    # (on a GPU the innermost frame is that line itself; here it is the simulated tolist)
    closure = [o for o in origins if " via mtopt/engine/closure.py:" in o]
    assert len(closure) == 1, origins
    assert origins[closure[0]] == 2
    assert per_step == sum(origins.values()) / 2
    assert not any("warnings.py" in o for o in origins)


def test_no_cuda_device_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_syncs.main([]) == 2
    assert capsys.readouterr().out.count("\n") == 1
