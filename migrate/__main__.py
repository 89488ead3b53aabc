"""``python -m migrate IN.json OUT.json`` (run from the pack's folder).

Rewrites a workflow made with cubiq's ComfyUI_IPAdapter_plus with this pack's nodes
(``rules.py``), in the format it came in (the editor's or the API's), and
prints what it did: one line per cubiq node left in place with the reason, notes where
ours means something else, a summary. Exit status 0 once OUT is written (also when
nodes were left in place), 2 with a one-line error when IN cannot be read or is not a
workflow. IN is never overwritten; OUT appears whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ipadapter.files import write_text_atomic

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


def run(source: Path, target: Path) -> list[str]:
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise MigrationError(f"{target} is the input; write the migrated workflow to another file")
    try:
        workflow, report = migrate(load(source))
    except MigrationError as error:
        raise MigrationError(f"{source}: {error}" if str(source) not in str(error) else str(error)) from None
    try:
        write_text_atomic(target, json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")
    except OSError as error:
        raise MigrationError(f"cannot write {target}: {error.strerror or error}") from None
    return [f"wrote {target} ({report.kind} format)", *report.lines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m migrate",
        description="Rewrite a workflow made with cubiq's ComfyUI_IPAdapter_plus with this pack's nodes.")
    parser.add_argument("input", type=Path, help="the workflow (editor or API format)")
    parser.add_argument("output", type=Path, help="where to write the result (not the input)")
    options = parser.parse_args(argv)
    try:
        lines = run(options.input, options.output)
    except MigrationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
