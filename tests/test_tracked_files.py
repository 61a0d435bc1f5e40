"""The tracked tree stays small: the device machine carries at most 64 MiB of working tree, and results are
summaries (per-request records compressed beside them, `fastswitch/bench/report.py`)."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILE_LIMIT = 1_000_000
TREE_LIMIT = 15_000_000


def _tracked() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def test_no_tracked_file_is_over_1_mb_and_the_tree_is_under_15_mb():
    sizes = {path: path.stat().st_size for path in _tracked()}
    too_big = sorted(f"{path.relative_to(ROOT)} ({size / 1e6:.2f} MB)" for path, size in sizes.items() if size > FILE_LIMIT)
    assert not too_big, f"tracked files over {FILE_LIMIT / 1e6:.0f} MB: {', '.join(too_big)}"
    assert sum(sizes.values()) <= TREE_LIMIT, f"the tracked tree is {sum(sizes.values()) / 1e6:.1f} MB"
