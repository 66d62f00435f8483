"""``torchrun --nproc-per-node 2 -m mtopt train``: one run over two processes (gloo), the same
record as one process on the whole batches, and the distributed sampler's split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mtopt.experiments.data_parallel import shard

ARGS = [
    "train", "--problem", "multi_mnist/cl_rr", "--method", "mgda", "--epochs", "1",
    "--train-subset", "256", "--eval-subset", "200", "--batch-size", "64", "--quiet",
]  # fmt: skip


def _run(prefix: list[str], tmp_path, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*prefix, *ARGS, "--run-dir", str(tmp_path / name), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_torchrun_trains_one_run_like_one_process(tmp_path, mnist):
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    torchrun += ["-m"]
    two = _run([*torchrun, "mtopt"], tmp_path, "two")
    one = _run([sys.executable, "-m", "mtopt"], tmp_path, "one")
    assert two["key"] == one["key"]
    # float32 model: the two halves' means differ from the whole batch's in the last bits
    for a, b in zip(two["history"], one["history"], strict=True):
        for task, value in b["train_loss"].items():
            assert a["train_loss"][task] == pytest.approx(value, rel=1e-5)
    for task, metrics in one["test"].items():
        for metric, value in metrics.items():
            assert two["test"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6)
    assert two["test_delta_m"] == pytest.approx(one["test_delta_m"], abs=1e-3)
    # rank 0 alone wrote its store: one record per run (two references and the run)
    from mtopt.experiments.database import RunDatabase

    assert RunDatabase(tmp_path / "two" / "mtopt.sqlite", readonly=True).count() == 3


def test_shard_splits_a_batch_evenly_in_rank_order():
    batch = {"x": torch.arange(12).reshape(6, 2), "y": torch.arange(6), "name": "b"}
    parts = [shard(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert [p["y"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert parts[1]["name"] == "b"
    assert shard(batch, 0, 1) is batch
    with pytest.raises(ValueError, match="cannot be split evenly over 4 processes"):
        shard(batch, 0, 4)


@pytest.mark.parametrize(
    ("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl"), ("cuda:1", "nccl")]
)
def test_the_backend_follows_the_runs_device(device, backend, monkeypatch):
    # on a machine with GPUs, a CPU run under torchrun took nccl, which carries no CPU tensor
    from mtopt.experiments import data_parallel

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(data_parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(data_parallel.dist, "init_process_group", chosen.append)
    monkeypatch.setattr(data_parallel.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(data_parallel.dist, "get_world_size", lambda: 2)
    assert data_parallel.init(device) == (0, 2)
    assert chosen == [backend]


def test_under_torchrun_a_numbered_gpu_is_refused(monkeypatch):
    # --device cuda:1 put every rank on GPU 1 while the group had set each rank's LOCAL_RANK GPU
    from mtopt.errors import ConfigError
    from mtopt.experiments import data_parallel, train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(data_parallel, "rank_and_world", lambda: (1, 2))
    assert train._device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'cuda:0' under torchrun: pass --device cuda"):
        train._device("cuda:0")
    monkeypatch.setattr(data_parallel, "rank_and_world", lambda: (0, 1))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert train._device("cuda:0") == torch.device("cuda", 0)  # one process: as given
    assert train._device("cuda:1") == torch.device("cuda", 1)
    # a GPU the machine lacks: the caller's mistake before training, not a failed run
    with pytest.raises(ConfigError, match=r"'cuda:2': this machine has 2 CUDA device\(s\)"):
        train._device("cuda:2")
