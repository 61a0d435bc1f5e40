"""benchmarks/gpu/check.sh's bookkeeping, on this machine: its functions sourced (nothing of the device run
starts), steps that pass, fail, time out or ignore the interrupt, and the real GPU tests skipping on a CPU."""

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")


def check(tmp_path, body: str, **env) -> tuple[int, str, str]:
    """Runs `body` after sourcing check.sh and init (OUT=tmp_path/out); exit code, steps.md, summary.md."""
    out = tmp_path / "out"
    script = f'source benchmarks/gpu/check.sh\nGRACE=1\nOUT="{out}"\ninit\n{body}\n'
    script += f'cp "$work/steps.md" "{tmp_path}"\nfinish'
    run_env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"} | env
    proc = subprocess.run(["bash", "-c", script], check=False, cwd=ROOT, env=run_env, capture_output=True, text=True,
                          timeout=120)
    assert (out / "summary.md").exists() and tarfile.is_tarfile(out / "gpu_check.tar.gz"), proc.stderr
    return proc.returncode, (tmp_path / "steps.md").read_text(), (out / "summary.md").read_text()


def test_every_step_ok_exits_0(tmp_path):
    rc, steps, summary = check(tmp_path, "step one 5 true\nstep two 5 true")
    assert rc == 0, summary
    assert steps.splitlines()[0].startswith("- one: ok in ") and "PASS (exit 0)" in summary


def test_a_failed_or_timed_out_step_exits_1_and_says_why(tmp_path):
    # stubborn ignores SIGINT: killed GRACE s later; late: a tests step with no time left
    rc, steps, summary = check(tmp_path, """step good 5 true
step bad 5 false
step slow 1 sleep 10
step stubborn 1 bash -c 'trap "" INT; sleep 10'
tests_step late 0 gpu_smoke
step after 5 true""")
    assert rc == 1, summary
    lines = dict(line[2:].split(": ", 1) for line in steps.splitlines())
    assert lines["good"].startswith("ok") and lines["after"].startswith("ok")
    assert lines["bad"].startswith("FAILED: exit 1 in ")
    assert lines["slow"].startswith("FAILED: timed out, exit 124, in ")
    assert lines["stubborn"].startswith("FAILED: timed out, killed, exit 137, in ")
    assert lines["late"].startswith("FAILED: no time left")
    assert "FAIL (exit 1): bad slow stubborn late" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the smoke tests would run, not skip")
def test_gpu_tests_that_all_skip_fail_the_check_except_on_a_dry_run(tmp_path):
    rc, steps, _ = check(tmp_path, "tests_step tests-smoke 120 gpu_smoke")
    assert rc == 1 and steps.startswith("- tests-smoke: FAILED: 0 tests passed (0 passed, 0 failed, 7 skipped)")
    (tmp_path / "out").rename(tmp_path / "first")
    rc, steps, summary = check(tmp_path, "tests_step tests-smoke 120 gpu_smoke", DRY_RUN="1")
    assert rc == 0 and steps.startswith("- tests-smoke: ok in "), steps
    assert steps.rstrip().endswith("0 passed, 0 failed, 7 skipped") and "DRY_RUN" in summary
