"""Append-only JSONL result store: one record per evaluated case, durable before the next case.

A record is a flat JSON object. Its identity is :data:`KEY_FIELDS` (model, method, task,
case_id); :meth:`ResultStore.done_keys` lists the identities already written, so a run killed
at any point resumes with the first case it had not finished. Each record is flushed and
fsynced as it is appended; a kill in the middle of a write leaves at most one incomplete last
line, which readers skip with a warning and the next append removes.

Every record also carries :func:`environment_info`: package versions, device and date.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

import longinfer

logger = logging.getLogger(__name__)

__all__ = ["KEY_FIELDS", "ResultStore", "record_key", "environment_info", "device_name"]

KEY_FIELDS: tuple[str, ...] = ("model", "method", "task", "case_id")


def record_key(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The identity of a record: its :data:`KEY_FIELDS` values as strings."""
    missing = [f for f in KEY_FIELDS if f not in record]
    if missing:
        raise ValueError(f"result record lacks the key field(s) {missing}; every record needs {KEY_FIELDS}")
    return tuple(str(record[f]) for f in KEY_FIELDS)


def device_name(device: torch.device | str) -> str:
    """A readable name of the device a model runs on (GPU model, or the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment_info(device: torch.device | str) -> dict[str, Any]:
    """Versions of torch/transformers/triton/longinfer and the device name (no date: see ``now``)."""
    versions: dict[str, str | None] = {"torch": torch.__version__, "longinfer": longinfer.__version__}
    for module_name in ("transformers", "triton"):
        try:
            versions[module_name] = __import__(module_name).__version__
        except ImportError:
            versions[module_name] = None
    return {"versions": versions, "device": device_name(device), "python": platform.python_version()}


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class ResultStore:
    """An append-only JSONL file of result records.

    Reads tolerate an incomplete last line (a killed writer) with a warning; any other line
    that is not a JSON object raises ``ValueError`` naming the file and line, since that is
    corruption this store cannot explain.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())

    def records(self) -> list[dict[str, Any]]:
        """All complete records, in file order (empty when the file does not exist)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        records: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            is_unterminated_last = number == len(lines)  # no newline after it
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if is_unterminated_last:
                    logger.warning(
                        "%s: ignoring an incomplete last line (%d bytes), left by an interrupted write",
                        self.path,
                        len(line),
                    )
                    continue
                raise ValueError(
                    f"{self.path}:{number}: not valid JSON ({exc}); the file is corrupt"
                ) from exc
            if not isinstance(record, dict):
                raise ValueError(f"{self.path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
        return records

    def index(self) -> dict[tuple[str, ...], dict[str, Any]]:
        """Records by :func:`record_key` (a later record of the same key wins)."""
        return {record_key(r): r for r in self.records()}

    def done_keys(self) -> set[tuple[str, ...]]:
        """Keys of every case already recorded: a resumed run skips these."""
        return set(self.index())

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record and make it durable (flush + fsync) before returning."""
        record_key(record)
        line = json.dumps(record, sort_keys=True, allow_nan=True, default=_json_default) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def _repair_tail(self) -> None:
        """Make the file end with a newline: drop an incomplete last record, or terminate a complete one."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) == b"\n":
                return
            handle.seek(0)
            data = handle.read()
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            try:
                json.loads(tail)
            except json.JSONDecodeError:
                logger.warning(
                    "%s: removing an incomplete last line (%d bytes) before appending", self.path, len(tail)
                )
                handle.truncate(cut)
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())


def _json_default(value: Any) -> Any:
    """JSON for the few non-JSON types records may hold (paths, tensors' scalars, tuples)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"result field of type {type(value).__name__} is not JSON serializable; convert it first")
