"""On-disk cache of candidate timings, keyed by device, dtype, input shape and candidate.

The file is JSON at ``$TUCKER_FX_CACHE_DIR/timings.json`` (default
``~/.cache/tucker_fx/timings.json``); a corrupt file is ignored and rewritten.

Example:
    >>> import tempfile, os
    >>> from tucker_fx.tuning.cache import TimingCache
    >>> path = os.path.join(tempfile.mkdtemp(), "t.json")
    >>> c = TimingCache(path)
    >>> c.put({"device": "cpu", "candidate": "fft"}, 1.5); c.save()
    >>> TimingCache(path).get({"candidate": "fft", "device": "cpu"})
    1.5
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["TimingCache", "default_cache_path", "device_key"]


def default_cache_path() -> Path:
    root = os.environ.get("TUCKER_FX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tucker_fx")
    return Path(root) / "timings.json"


def device_key(device: Union[str, torch.device]) -> str:
    """Names the hardware a timing belongs to (CPU model and thread count, or GPU name)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    return f"cpu:{cpu}:{torch.get_num_threads()}threads"


class TimingCache:
    """A dict from JSON-able keys to milliseconds, persisted on :meth:`save`."""

    def __init__(self, path: Optional[Union[str, os.PathLike]] = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self._data = self._read()
        self._new: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {k: float(v) for k, v in loaded.items() if isinstance(v, (int, float))} if isinstance(loaded, dict) else {}

    @staticmethod
    def _key(key: dict[str, Any]) -> str:
        return json.dumps({"torch": torch.__version__, **key}, sort_keys=True, default=str)

    def get(self, key: dict[str, Any]) -> Optional[float]:
        return self._data.get(self._key(key))

    def put(self, key: dict[str, Any], ms: float) -> None:
        self._data[self._key(key)] = self._new[self._key(key)] = float(ms)

    def save(self) -> None:
        """Write this cache's new timings, merged into what the file holds now (another cache
        object or process may have written it since this one was read)."""
        if not self._new:
            return
        try:
            merged = {**self._read(), **self._new}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(merged, indent=0), encoding="utf-8")
            tmp.replace(self.path)
            self._data, self._new = {**merged, **self._data}, {}
        except OSError:
            pass  # a read-only home must not break compression
