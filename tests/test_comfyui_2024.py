"""The compatibility run: the suite's ``comfyui_2024`` subset again, on the ComfyUI of March 2024.

The suite runs on ComfyUI v0.3.75; users on older installs still get a pack that loads
and patches. The subset: the pack loads in a server with its nodes registered, the SD1.5
and SDXL patch tests (``test_comfy_patch.py``, ``test_sdxl_patch.py``, without the full-size
SDXL run) and one workflow
headless. It runs in a pytest of its own, with ``COMFYUI_PATH`` on the March 2024 copy
(``python -m devtools.comfyui_setup --release 2024-03``): one ComfyUI per process.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.comfyui_setup import COMPAT_RELEASE, COMFYUI_PATH_ENV, ensure_pinned_comfyui

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
# the subset: the pack loads (1), the patch tests of both families (20), SDXL's own scaled-down ones (10)
# and one workflow (1); the full-size SDXL check (30 s) runs on the current ComfyUI only
AT_LEAST = 32
FULL_SIZE_SDXL = "test_sdxl_patch.py::test_full_size_sdxl_runs_in_a_process_of_its_own"


def test_the_compatibility_subset_passes_on_the_march_2024_comfyui():
    comfyui = ensure_pinned_comfyui(release=COMPAT_RELEASE)
    assert "comfyui_version.py" not in os.listdir(comfyui)  # it is the 2024 copy (the file came later)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "comfyui_2024", "--deselect", FULL_SIZE_SDXL,
                          "--durations=5", str(TESTS)],
                         cwd=TESTS, env={**os.environ, COMFYUI_PATH_ENV: str(comfyui)},
                         capture_output=True, text=True, timeout=1500)
    report = run.stdout[-4000:] + run.stderr[-2000:]
    print(report)
    assert run.returncode == 0, report
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= AT_LEAST and " failed" not in run.stdout, report
