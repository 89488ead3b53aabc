"""devtools.heavy_fixtures: a build runs once per key, in a process of its own; a failure says why."""
import sys

import pytest

from devtools.heavy_fixtures import BackgroundBuild, source_digest

WRITE = "import json, sys, pathlib; pathlib.Path(sys.argv[-1], 'results.json').write_text(json.dumps({'at': sys.argv[-1]}))"


def test_a_build_runs_once_per_key_and_its_paths_point_to_the_final_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("IPADAPTER_TEST_CACHE", str(tmp_path))
    first = BackgroundBuild("demo", "key1", [sys.executable, "-c", WRITE])
    assert first.process is not None
    assert first.result() == {"at": str(tmp_path / "demo" / "key1")}  # the partial folder's path, rewritten
    again = BackgroundBuild("demo", "key1", [sys.executable, "-c", "raise SystemExit(3)"])
    assert again.process is None and again.result() == {"at": str(tmp_path / "demo" / "key1")}
    other = BackgroundBuild("demo", "key2", [sys.executable, "-c", WRITE])
    assert other.process is not None and other.result()["at"].endswith("key2")


def test_a_failed_build_says_why_and_an_unfinished_one_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("IPADAPTER_TEST_CACHE", str(tmp_path))
    failing = BackgroundBuild("demo", "bad", [sys.executable, "-c", "print('no data here'); raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match=r"building demo failed \(exit 3\):\nno data here"):
        failing.result()
    slow = BackgroundBuild("demo", "slow", [sys.executable, "-c", "import time; time.sleep(60)"])
    slow.stop()
    assert not (tmp_path / "demo" / "slow").exists() and not (tmp_path / "demo" / "slow.partial").exists()


def test_the_key_follows_the_sources():
    assert source_digest(["ipadapter/registry"]) == source_digest(["ipadapter/registry"])
    assert source_digest(["ipadapter/registry"]) != source_digest(["ipadapter/registry"], "another torch")
    assert source_digest(["ipadapter/registry"]) != source_digest(["ipadapter/registry", "nodes.py"])
