"""tools/shapes_worlds.py: runs on several world seeds compared with each world as one observation."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import shapes_worlds  # noqa: E402

PAIRS = ("ControlNet++ - ControlNet", "InnerControl - ControlNet", "InnerControl - ControlNet++")


def write_run(folder, world_seed, means, significant, control="depth"):
    """A results.json with the fields the tool reads; pair i has mean means[i], interval mean +- 0.1."""
    os.makedirs(folder)
    table = [{"method": "ControlNet (stage 5, before fine-tuning)", "score": [21.0]},
             {"method": "InnerControl (+120 steps)", "score": [19.0, 19.4]}]
    pairs = [{"pair": p, "mean": m, "lo": m - 0.1, "hi": m + 0.1, "significant": s}
             for p, m, s in zip(PAIRS, means, significant)]
    probe = [{"bucket": "0-200", "verdict": "x0"}, {"bucket": "800-1000", "verdict": "probe"}]
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"control": control, "metric": "depth RMSE", "table": table, "pairs": pairs,
                   "floor": {"reconstruction": 13.0}, "checks": {"gain_over_distance_to_floor": 0.25},
                   "probe_by_timestep": probe, "preset": {"world_seed": world_seed}}, f)
    return str(folder)


def tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "shapes_worlds.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_t_interval_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for n in (2, 3, 5, 7, 31, 40):
        xs = [((7 * i) % 5) * 0.1 - 0.2 + 0.01 * i for i in range(n)]
        mean, lo, hi = shapes_worlds.t_interval(xs)
        sem = scipy_stats.sem(xs)
        q = scipy_stats.t.ppf(0.975, n - 1) if n <= 31 else 1.96
        assert mean == pytest.approx(sum(xs) / n)
        assert (hi - lo) / 2 == pytest.approx(q * sem, rel=2e-4)


def test_pairs_across_worlds(tmp_path):
    runs = [write_run(tmp_path / "w0", 0, (-0.1, -0.5, -0.3), (True, True, True)),
            write_run(tmp_path / "w1", 1, (-0.1, -0.2, -0.1), (False, True, False)),
            write_run(tmp_path / "w2", 2, (-0.1, +0.2, +0.1), (False, False, False))]
    p = tool(*runs)
    assert p.returncode == 0, p.stderr
    # InnerControl - ControlNet++: -0.3, -0.1, +0.1: mean -0.1, sd 0.2, half-width t(2) * 0.2 / sqrt(3) = 0.4969
    line = next(x for x in p.stdout.splitlines() if x.startswith("| InnerControl - ControlNet++ | -0.10 |"))
    assert "[-0.60, +0.40] | 2 (1) | 1 (0) |" in line, line
    line = next(x for x in p.stdout.splitlines() if x.startswith("| ControlNet++ - ControlNet | -0.10 |"))
    assert "[-0.10, -0.10] | 3 (1) | 0 (0) |" in line, line
    assert "| 1 | x0 | probe |" in p.stdout
    assert "| 2 | 21.00 | 19.20 | 13.00 | 0.25 |" in p.stdout


def test_bad_input_fails_in_one_line(tmp_path):
    a = write_run(tmp_path / "a", 0, (0, 0, 0), (False,) * 3)
    same_world = write_run(tmp_path / "b", 0, (0, 0, 0), (False,) * 3)
    edges = write_run(tmp_path / "c", 1, (0, 0, 0), (False,) * 3, control="hed")
    for args, message in [((a, same_world), "both world seed 0"), ((a, edges), "different controls"),
                          ((a,), "at least two runs"), ((a, str(tmp_path / "missing")), "not found")]:
        p = tool(*args)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr
