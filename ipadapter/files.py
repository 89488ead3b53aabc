"""Files: reading weights safely (safetensors, or torch pickles restricted to tensors), and writing
any file so that it appears whole or not at all."""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path


def read_weights(path: Path, kind: str, error: type[ValueError]) -> tuple[dict, dict[str, str]]:
    """The dict in a weights file and its safetensors metadata; ``error`` carries a one-line reason."""
    import torch  # here, not at the top: the workflow migrator writes through this module without torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    name = path.name
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise error(f"{kind} file '{path}' {where}; expected a .safetensors or .bin file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as reason:
            raise error(
                f"'{name}' is not a readable .safetensors file ({first_line(reason)}); "
                "the file may be truncated or corrupt, expected a complete safetensors file"
            ) from None
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as reason:
        raise error(
            f"'{name}' was refused: its pickle asks to run code or build non-tensor objects "
            f"({first_line(reason)}); expected a plain dict of tensors (or use a .safetensors file)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as reason:
        raise error(
            f"'{name}' is not a readable torch file ({first_line(reason)}); "
            "the file may be truncated or corrupt, expected a .bin saved with torch.save"
        ) from None
    if not isinstance(loaded, dict):
        raise error(f"'{name}' holds a {type(loaded).__name__}; expected a dict of tensors")
    return loaded, {}


def first_line(reason: BaseException) -> str:
    text = str(reason).strip().splitlines()
    return text[0][:200] if text else type(reason).__name__


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it becomes ``path`` only when the block completes.

    A crash or an error inside the block leaves whatever was at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the file from other users (a shared ComfyUI)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)
