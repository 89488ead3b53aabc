"""``python -m migrate IN.json OUT.json [--ours] [--family ID]`` (run from the pack's folder).

Rewrites a workflow made with cubiq's ComfyUI_IPAdapter_plus with this pack's nodes
(``rules.py``), in the format it came in (the editor's or the API's). By default the
result reproduces cubiq's pictures where our nodes can express them (the faithful mode);
``--ours`` keeps this pack's own behaviour. It prints what it did: the mode, per cubiq node
its old id → the new ids, what changed and the mode, or why it was left in place, what to
check, and a summary. Exit status 0 once OUT is written (also when nodes were left in
place), 2 with a one-line error when IN cannot be read or is not a workflow. IN is never
overwritten; OUT appears whole or not at all. ``python -m ipadapter migrate`` is the same.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ipadapter.files import write_text_atomic

from .faithful import families
from .rules import MigrationError, migrate


def load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MigrationError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}; "
                             "expected a workflow file saved by ComfyUI (.json)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MigrationError(f"{path} is not JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                             "expected a workflow saved by ComfyUI's editor or its API format") from None


def run(source: Path, target: Path, ours: bool = False, family: str | None = None) -> list[str]:
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise MigrationError(f"{target} is the input; write the migrated workflow to another file")
    try:
        workflow, report = migrate(load(source), "ours" if ours else "faithful", family)
    except MigrationError as error:
        raise MigrationError(f"{source}: {error}" if str(source) not in str(error) else str(error)) from None
    try:
        write_text_atomic(target, json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")
    except OSError as error:
        raise MigrationError(f"cannot write {target}: {error.strerror or error}") from None
    return [f"wrote {target} ({report.kind} format)", *report.lines()]


DESCRIPTION = ("Rewrite a workflow made with cubiq's ComfyUI_IPAdapter_plus with this pack's nodes. By default the "
               "result gives cubiq's pictures where our nodes can express it: the middle block off (custom layer "
               "weights), a black negative image for plus adapters, precise boosts and layer weights as one Apply. "
               "The report gives, per cubiq node, the new node ids, what changed, the mode, and what to check.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", type=Path, help="the workflow (editor or API format)")
    parser.add_argument("output", metavar="OUT", type=Path, help="where to write the result (not the input)")
    parser.add_argument("--ours", action="store_true",
                        help="keep this pack's own behaviour (its middle block patched, its blank negative input, "
                             "precise boosts as a second Apply) instead of reproducing cubiq's pictures")
    parser.add_argument("--family", choices=[family.id for family in families()],
                        help="the model's family where the graph does not say it (the file names of the adapter "
                             "and the checkpoint, a one-family preset): the faithful mode needs its layer keys")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migrate", description=DESCRIPTION)
    add_arguments(parser)
    options = parser.parse_args(argv)
    try:
        lines = run(options.input, options.output, options.ours, options.family)
    except MigrationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
