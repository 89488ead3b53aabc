"""A ``.safetensors`` copy of a torch-pickle weights file (``.bin``/``.pt``/``.pth``).

The pickle is read with ``torch.load(weights_only=True)`` (:func:`files.read_weights`), so
nothing in it runs. Nested dicts are flattened with dots, the layout of the released
IP-Adapter ``.safetensors`` files (``{"image_proj": {"proj.weight": t}}`` ->
``image_proj.proj.weight``). Plain str / int / float values go into the file's metadata;
anything else that is not a tensor is refused, naming its key.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import atomic_path, first_line, read_weights

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
METADATA_TYPES = (str, int, float)  # bool is an int


class ConvertError(ValueError):
    """A file that cannot be converted, or a target that cannot be written; the message is one line."""


def convert_weights(source: Path, target: Path, dtype: torch.dtype | str | None = None, check: bool = False) -> Path:
    """Write ``target`` (``.safetensors``) with the tensors of ``source``; ``dtype`` casts the floating ones.

    ``target`` appears whole or not at all: on any error an existing file there is left as it was.
    ``check`` re-reads the written file and compares every tensor bit for bit before it replaces ``target``.
    """
    source, target = Path(source), Path(target)
    check_target(source, target)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    loaded, source_metadata = read_weights(source, "weights", ConvertError)
    tensors, values = flatten(loaded, source.name)
    if not tensors:
        raise ConvertError(f"'{source.name}' holds no tensors; expected a dict of tensors")
    tensors = separate_storage(cast(tensors, dtype))
    # "format" as transformers and diffusers expect it of a .safetensors file; metadata values are strings
    metadata = {"format": "pt", **source_metadata, **{key: str(value) for key, value in values.items()}}
    try:
        with atomic_path(target) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
            if check:
                compare(tensors, metadata, temporary, target.name)
    except KeyError as missing:  # safetensors' table of dtypes lacks this one (complex128, quantized)
        key = next((k for k, t in tensors.items() if t.dtype == missing.args[0]), None)
        if key is None:
            raise
        found = str(tensors[key].dtype).removeprefix("torch.")
        raise ConvertError(f"'{source.name}': tensor '{key}' is {found}, which safetensors cannot hold") from None
    except (OSError, SafetensorError) as reason:
        reason_text = getattr(reason, "strerror", None) or first_line(reason)
        raise ConvertError(f"cannot write '{target}': {reason_text}") from None
    return target


def check_target(source: Path, target: Path) -> None:
    if target.suffix != ".safetensors":
        raise ConvertError(f"'{target}' does not end in .safetensors; expected an output path like 'model.safetensors'")
    if target.resolve() == source.resolve() or target.exists() and source.exists() and os.path.samefile(source, target):
        raise ConvertError(f"'{target}' is the input; write the copy to another file")


def flatten(tree: dict, source: str, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and plain values of a nested dict, keyed by their dotted paths."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            inner_tensors, inner_values = flatten(value, source, f"{name}.")
            found = [*inner_tensors, *inner_values]
        elif isinstance(value, torch.Tensor):
            inner_tensors, inner_values, found = {name: value}, {}, [name]
        elif isinstance(value, METADATA_TYPES):
            inner_tensors, inner_values, found = {}, {name: value}, [name]
        else:
            raise ConvertError(
                f"'{source}': '{name}' holds a {type(value).__name__}; expected tensors "
                "(or str / int / float values, kept as metadata)"
            )
        # {"a.b": t, "a": {"b": t}} would flatten to the same name twice
        duplicate = next((n for n in found if n in tensors or n in values), None)
        if duplicate is not None:
            raise ConvertError(f"'{source}': '{duplicate}' occurs twice once nested dicts are joined with dots")
        tensors.update(inner_tensors)
        values.update(inner_values)
    return tensors, values


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {key: t.to(dtype) if t.is_floating_point() else t for key, t in tensors.items()}


def separate_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with a storage of its own: safetensors refuses shared storage (tied weights, views)."""
    owners: set[tuple] = set()
    separate = {}
    for key, tensor in tensors.items():
        if tensor.layout is not torch.strided:
            raise ConvertError(f"'{key}' is a {tensor.layout} tensor; safetensors holds dense tensors only")
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        owner = (tensor.device, storage.data_ptr())
        if storage.nbytes() and owner in owners:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        owners.add(owner)
        separate[key] = tensor.contiguous()
    return separate


def compare(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, name: str) -> None:
    """Refuse a written file whose tensors (bit for bit) or metadata differ from ``tensors`` / ``metadata``."""
    with safe_open(str(path), framework="pt") as handle:
        if set(handle.keys()) != set(tensors):
            raise ConvertError(f"'{name}' does not read back as written: its tensor names differ")
        if dict(handle.metadata() or {}) != metadata:
            raise ConvertError(f"'{name}' does not read back as written: its metadata differs")
        for key, expected in tensors.items():
            found = handle.get_tensor(key)
            if found.dtype != expected.dtype or found.shape != expected.shape or not same_bits(found, expected):
                raise ConvertError(f"'{name}' does not read back as written: tensor '{key}' differs")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bytes, not values: NaN != NaN, and -0.0 == 0.0
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def describe_adapter(path: Path) -> str | None:
    """What IP-Adapter the file is ("SD1.5 plus (16 tokens, ...)"), or None for any other weights file."""
    from .adapter_file import AdapterFormatError, load_adapter

    try:
        return load_adapter(path, base_width=None).spec.describe()
    except AdapterFormatError:
        return None


def summary(path: Path) -> str:
    """'12 tensors (F16, I64), metadata: epoch, step' from the file's header."""
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        dtypes = sorted({str(handle.get_slice(key).get_dtype()) for key in keys})
        extra = sorted(set(handle.metadata() or {}) - {"format"})
    text = f"{len(keys)} tensors ({', '.join(dtypes)})"
    return text + (f", metadata: {', '.join(extra)}" if extra else "")
