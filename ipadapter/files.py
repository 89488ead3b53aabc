"""Reading weight files safely: safetensors, or torch pickles restricted to tensors."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


def read_weights(path: Path, kind: str, error: type[ValueError]) -> tuple[dict, dict[str, str]]:
    """The dict in a weights file and its safetensors metadata; ``error`` carries a one-line reason."""
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
