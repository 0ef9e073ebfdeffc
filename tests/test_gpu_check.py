"""tools/gpu_check.sh on the CPU, its parts played by a stand-in python3 first on PATH: the exit status says whether
every part ran and passed, the report names the part that failed, and a missing prerequisite stops it at once with
one line saying how to get it. No GPU, no network."""
import os
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# python3 as the script calls it: pip, pytest and bench.py answer as told; anything else (the report's header and
# goals, read from stdin) is the real interpreter
SHIM = """#!/usr/bin/env bash
echo "$*" >>"$SHIM_LOG"
case " $* " in
  " -c import diffusers ") exit "${SHIM_DIFFUSERS_RC:-0}" ;;
  *" -m pip install "*) exit 0 ;;
esac
if [ -n "${SHIM_FAIL:-}" ] && [[ " $* " == *" $SHIM_FAIL "* ]]; then echo "$SHIM_FAIL: it broke" >&2; exit 3; fi
case " $* " in
  *" -m pytest "*) echo "3 passed, 1 skipped in 0.50s" ;;
  *" bench.py "*) for name in "$@"; do
                   case $name in train-*|unet*|cfg-step*) echo "$name: 1.0 ms, ratio 0.5" ;; esac
                 done ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def run_check(tmp_path, wheel=True, **env):
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "tools", "gpu_check.sh"), repo / "tools" / "gpu_check.sh")
    if wheel:
        (repo / ".whl").mkdir()
        (repo / ".whl" / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(SHIM)
    (bin_dir / "python3").chmod(0o755 | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               SHIM_LOG=str(tmp_path / "calls.txt"), REAL_PYTHON=sys.executable, **env)
    r = subprocess.run(["bash", str(repo / "tools" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    calls = (tmp_path / "calls.txt").read_text() if (tmp_path / "calls.txt").exists() else ""
    return r, calls


@pytest.fixture(autouse=True)
def needs_tools():
    if shutil.which("timeout") is None or shutil.which("bash") is None:
        pytest.skip("needs bash and coreutils' timeout")


def test_a_failing_part_fails_the_check(tmp_path):
    r, calls = run_check(tmp_path, SHIM_FAIL="unet")
    assert r.returncode != 0
    report = (tmp_path / "out" / "gpu_report.txt").read_text()
    assert "== bench: unet, cfg-step: failed (exit code 3)" in report
    assert "== FAILED: bench: unet, cfg-step (failed (exit code 3))" in report
    # the other parts still ran, and passed
    for name in ("pytest -m cuda", "bench: train fp16", "bench: train-innercontrol-512"):
        assert f"== {name}: ok" in report, name
    assert "-m pytest -q -m cuda -rfE -s tests/" in calls  # fixture errors listed too
    assert "it broke" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_every_part_passing_exits_zero(tmp_path):
    r, calls = run_check(tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "== all parts ok" in r.stdout and "FAILED" not in r.stdout
    assert "train-innercontrol time ratio: 0.5 (goal <= 0.6): met" in r.stdout


def test_missing_diffusers_stops_with_how_to_get_it(tmp_path):
    r, calls = run_check(tmp_path, wheel=False, SHIM_DIFFUSERS_RC="1")
    assert r.returncode != 0
    lines = [x for x in r.stdout.splitlines() if "diffusers" in x]
    assert len(lines) == 1 and "python -m pip download diffusers==0.42.1 --no-deps -d .whl" in lines[0]
    assert "bench.py" not in calls and "pytest" not in calls  # nothing else ran


def test_parts_fit_a_rerun_in_one_device_call():
    """The caps add up to at most 360 s and the whole budget leaves a 600 s call room for the wheel's install."""
    import re
    text = open(os.path.join(REPO, "tools", "gpu_check.sh")).read()
    caps = [int(c) for c in re.findall(r'^part "[^"]+" (\d+) ', text, re.M)]
    deadline = int(re.search(r"DEADLINE=(\d+)", text).group(1))
    assert len(caps) >= 4 and sum(caps) <= 360 and sum(caps) <= deadline <= 420
