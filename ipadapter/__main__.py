"""``python -m ipadapter COMMAND ...`` (run from the pack's folder): tools for weights files.

  convert IN OUT [--dtype fp16|bf16|fp32] [--check]   a .safetensors copy of a .bin/.pt/.pth
  models [COMFYUI_DIR]                                 what each adapter / image encoder file is

Exit status 0 on success, 2 with a one-line error on stderr for input it cannot use.
A command is one entry in COMMANDS: its help, its arguments, and a function from the
parsed options to the lines to print, raising CommandFailed for a known error. Each
imports what it needs when it runs, so ``--help`` and a torch-free command load no torch.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class CommandFailed(Exception):
    """A known error; its message is the one line to print."""


@dataclass(frozen=True)
class Command:
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], list[str]]


def convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", type=Path,
                        help="a torch pickle: .bin, .pt, .pth (read with weights_only=True)")
    parser.add_argument("output", metavar="OUT", type=Path,
                        help="where to write the copy; must end in .safetensors, not the input")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                        help="cast the floating-point tensors (default: keep every dtype as it is)")
    parser.add_argument("--check", action="store_true",
                        help="re-read the written file and compare every tensor bit for bit")


def convert(options: argparse.Namespace) -> list[str]:
    from .convert import ConvertError, convert_weights, describe_adapter, summary

    # torch's note on a plain pickle's protocol would break the one-line error (and says nothing to a user)
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    try:
        target = convert_weights(options.input, options.output, options.dtype, options.check)
    except ConvertError as error:
        raise CommandFailed(str(error)) from None
    lines = [f"wrote {target}: {summary(target)}"]
    if options.check:
        lines.append("checked: every tensor reads back bit for bit")
    kind = describe_adapter(options.input)
    return lines + ([f"IP-Adapter: {kind}"] if kind else [])


def models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("comfyui", metavar="COMFYUI_DIR", nargs="?", type=Path,
                        help="ComfyUI's folder (default: $COMFYUI_PATH, else the current folder)")


def models(options: argparse.Namespace) -> list[str]:
    import os

    from .model_scan import configured_folders, files_in, format_table, model_table

    root = options.comfyui or Path(os.environ.get("COMFYUI_PATH", "."))
    adapters, encoders = configured_folders(root, "ipadapter"), configured_folders(root, "clip_vision")
    if not adapters and not encoders:
        raise CommandFailed(f"'{root}' has no models/ipadapter nor models/clip_vision folder; expected ComfyUI's folder")
    return [format_table(model_table(files_in(adapters), files_in(encoders))),
            f"folders: {', '.join(adapters + encoders)}"]


def migrate_arguments(parser: argparse.ArgumentParser) -> None:
    from migrate.__main__ import add_arguments

    add_arguments(parser)


def migrate_workflow(options: argparse.Namespace) -> list[str]:
    from migrate.__main__ import run
    from migrate.rules import MigrationError

    try:
        return run(options.input, options.output, options.ours, options.family)
    except MigrationError as error:
        raise CommandFailed(str(error)) from None


COMMANDS = {
    "convert": Command(
        help="write a .safetensors copy of a .bin/.pt/.pth weights file",
        description=(
            "Write a .safetensors copy of a torch-pickle weights file without running code from the pickle "
            "(torch.load with weights_only=True refuses a pickle that asks to). Nested dicts are joined with dots "
            "(image_proj.proj.weight), as in the released IP-Adapter .safetensors files; dtypes are kept unless "
            "--dtype is given; tensors that share storage are written as separate copies. Plain str / int / float "
            "values go into the file's metadata (as strings); any other non-tensor value is refused, naming its key. "
            "OUT appears whole or not at all: an existing OUT is left as it was on any error."),
        add_arguments=convert_arguments,
        run=convert,
    ),
    "models": Command(
        help="list what each file in models/ipadapter and models/clip_vision is",
        description=(
            "Read every weights file in ComfyUI's models/ipadapter and models/clip_vision folders (and the folders "
            "extra_model_paths.yaml adds) by its tensor shapes, whatever its name, and print a table: what each file "
            "is, the image encoder an adapter needs, the unified-loader presets it serves, and whether that encoder "
            "is present."),
        add_arguments=models_arguments,
        run=models,
    ),
    "migrate": Command(
        help="rewrite a workflow made with cubiq's ComfyUI_IPAdapter_plus with this pack's nodes",
        description=("The workflow migrator (python -m migrate): rewrites a workflow (editor or API format) made with "
                     "cubiq's ComfyUI_IPAdapter_plus with this pack's nodes. By default the result reproduces cubiq's "
                     "pictures where our nodes can express them; --ours keeps this pack's own behaviour. Prints, per "
                     "cubiq node, the new node ids, what changed, the mode, and what to check."),
        add_arguments=migrate_arguments,
        run=migrate_workflow,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipadapter", description="Tools for IP-Adapter weights files.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.description)
        command.add_arguments(sub)
    options = parser.parse_args(argv)
    try:
        lines = COMMANDS[options.command].run(options)
    except CommandFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
