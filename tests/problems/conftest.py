"""The data loaders' tests run without the user's data folders: ``$MTOPT_DATA``,
``$MTOPT_FASHION_DATA`` and ``$MTOPT_YEAST_DATA`` are unset for each test (a test that wants one
sets it), so that a loader called without ``data_dir`` goes to the cache the test chose."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_user_data_folders(monkeypatch):
    for name in ("MTOPT_DATA", "MTOPT_FASHION_DATA", "MTOPT_YEAST_DATA"):
        monkeypatch.delenv(name, raising=False)
