"""Finished runs as one JSON file each, named by the run config's hash.

A result is written atomically (temporary file, then rename) only after its run finished, so a
comparison that is killed and started again skips every finished run and redoes the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / "runs" / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.exists():
            return None
        with path.open() as fh:
            return json.load(fh)

    def put(self, result: dict[str, Any]) -> Path:
        path = self.path(result["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("w") as fh:
            json.dump(result, fh, indent=1)
        tmp.replace(path)
        return path
