"""The registry holds every family fact: product code outside ``ipadapter/registry/`` names no family and
none of their widths, and the registry's own facts agree with the files shipped beside the trainer."""
import io
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ["__init__.py", "nodes.py", "patcher.py", "ipadapter", "comfyui_glue", "migrate", "training"]
REGISTRY = REPO / "ipadapter" / "registry"
FAMILY_NAMES = {"SD15", "SDXL"}  # the entries' names
FAMILY_IDS = {"sd15", "sdxl"}  # their ids, as string literals
WIDTHS = {768, 1024, 1280, 2048}  # the families' and their encoders' widths
# numbers with those values that are no family fact, each a named constant: (file, how its line starts)
NAMED_CONSTANTS = {("ipadapter/choices.py", "C_PENALTY_WIDTH = 1280  #")}


def product_files():
    for entry in PRODUCT:
        path = REPO / entry
        yield from [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if REGISTRY not in p.parents)


def family_facts_in(path: Path) -> list[str]:
    """``file:line: token`` for each family name, family id or family width in the code (not in comments or prose)."""
    relative = str(path.relative_to(REPO))
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        kind, text = token.type, token.string
        is_fact = (kind == tokenize.NAME and text in FAMILY_NAMES
                   or kind == tokenize.STRING and text.strip("\"'") in FAMILY_IDS
                   or kind == tokenize.NUMBER and text.replace("_", "").isdigit() and int(text.replace("_", "")) in WIDTHS)
        if not is_fact:
            continue
        line = lines[token.start[0] - 1].strip()
        if not any(relative == file and line.startswith(start) for file, start in NAMED_CONSTANTS):
            found.append(f"{relative}:{token.start[0]}: {line}")
    return found


def test_product_code_outside_the_registry_names_no_family_and_no_family_width():
    found = [place for path in product_files() for place in family_facts_in(path)]
    assert found == [], "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan above would catch each kind of family fact (and leaves prose alone)."""
    sample = REPO / "tests" / "_registry_scan_sample.py"
    sample.write_text('"""SDXL and sd15 in prose."""\nfamily = SDXL if name == "sd15" else None  # 1280 wide\n'
                      'width = 2048\nother = 2049\n')
    try:
        found = family_facts_in(sample)
    finally:
        sample.unlink()
    assert [place.split(": ", 1)[0].rsplit(":", 1)[1] for place in found] == ["2", "2", "3"], found
