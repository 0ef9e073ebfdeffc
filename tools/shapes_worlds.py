"""Compare the methods across shapes-world runs on independent trajectories (world seeds).

    for w in 0 1 2; do SHAPES_PRESET="{\"world_seed\": $w}" python train.py --control depth --out runs/w$w; done
    python tools/shapes_worlds.py runs/w0 runs/w1 runs/w2

A run's own pair intervals cover its fine-tuning seeds and held-out scenes, not the stages it fine-tunes from (the base
model, the stage-5 ControlNet, the probe), and those differ from one world seed to the next. Here each world counts as
one observation: for each pair of methods, its mean difference in every run, their mean over the runs with a 95%
Student-t interval over the runs, and in how many runs each method was ahead (and significantly so). It also lists
each run's checks and the probe's per-bucket verdicts side by side.
"""
import argparse
import json
import math
import os
import sys

# Student's t, 0.975 quantile, for 1-30 degrees of freedom (any statistics table); 1.96 beyond
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(xs):
    """Mean of xs with a 95% Student-t interval (the worlds as independent draws)."""
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def load_runs(folders):
    runs = []
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.exists(path):
            sys.exit(f"shapes_worlds.py: error: {path} not found; finish that run first (python train.py --control ...)")
        with open(path) as f:
            r = json.load(f)
        r["folder"], r["world_seed"] = folder, r["preset"].get("world_seed", 0)
        runs.append(r)
    controls = sorted({r["control"] for r in runs})
    if len(controls) > 1:
        sys.exit(f"shapes_worlds.py: error: the runs are of different controls ({', '.join(controls)}); compare one "
                 "control at a time")
    seen = {}
    for r in runs:
        if r["world_seed"] in seen:
            sys.exit(f"shapes_worlds.py: error: {seen[r['world_seed']]} and {r['folder']} are both world seed "
                     f"{r['world_seed']}: the same trajectory would count twice; give one run per world seed")
        seen[r["world_seed"]] = r["folder"]
    return runs


def summarize(runs):
    """Across the runs, for each pair: the per-run means, their mean and 95% t-interval, and how many runs had each
    method ahead (and significantly). Lower is better for depth RMSE, higher for SSIM."""
    lower_better = runs[0]["control"] == "depth"
    out = []
    for i, pair in enumerate(r["pair"] for r in runs[0]["pairs"]):
        rows = [r["pairs"][i] for r in runs]
        means = [p["mean"] for p in rows]
        first_ahead = [(m < 0) == lower_better for m in means]  # the pair reads "first - second"
        mean, lo, hi = t_interval(means)
        out.append({"pair": pair, "means": means, "mean": mean, "lo": lo, "hi": hi,
                    "first_ahead": sum(first_ahead), "second_ahead": len(means) - sum(first_ahead),
                    "first_significant": sum(a and p["significant"] for a, p in zip(first_ahead, rows)),
                    "second_significant": sum((not a) and p["significant"] for a, p in zip(first_ahead, rows))})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="finished shapes-world run folders, one per world seed")
    args = parser.parse_args()
    if len(args.runs) < 2:
        sys.exit("shapes_worlds.py: error: give at least two runs (one per world seed) to compare across worlds")
    runs = load_runs(args.runs)
    fmt = ".2f" if runs[0]["control"] == "depth" else ".4f"
    print(f"{runs[0]['metric']}; mean over the fine-tuning seeds\n")
    methods = [row["method"] for row in runs[0]["table"]]
    print("| world seed | " + " | ".join(methods) + " | floor | best gain / distance to floor |")
    print("| --- " * (len(methods) + 3) + "|")
    for r in runs:
        scores = [sum(row["score"]) / len(row["score"]) for row in r["table"]]
        print(f"| {r['world_seed']} | " + " | ".join(f"{s:{fmt}}" for s in scores) +
              f" | {r['floor']['reconstruction']:{fmt}} | {r['checks']['gain_over_distance_to_floor']:.2f} |")
    print("\n| pair | " + " | ".join(f"world seed {r['world_seed']}" for r in runs) + " |")
    print("| --- " * (len(runs) + 1) + "|")
    for i, pair in enumerate(row["pair"] for row in runs[0]["pairs"]):
        cells = [r["pairs"][i] for r in runs]
        print(f"| {pair} | " + " | ".join(f"{'**' if c['significant'] else ''}{c['mean']:+{fmt}} [{c['lo']:+{fmt}}, "
                                          f"{c['hi']:+{fmt}}]{'**' if c['significant'] else ''}" for c in cells) + " |")
    print(f"\nAcross the {len(runs)} worlds (each world one observation; 95% Student-t interval over the worlds):\n")
    print("| pair | mean over worlds | 95% interval | first ahead in (significantly) | second ahead in (significantly) |")
    print("| --- | --- | --- | --- | --- |")
    for s in summarize(runs):
        print(f"| {s['pair']} | {s['mean']:+{fmt}} | [{s['lo']:+{fmt}}, {s['hi']:+{fmt}}] | "
              f"{s['first_ahead']} ({s['first_significant']}) | {s['second_ahead']} ({s['second_significant']}) |")
    buckets = [b["bucket"] for b in runs[0]["probe_by_timestep"]]
    print("\nThe probe against the reward model on x0_hat, the better reading per t bucket:\n")
    print("| world seed | " + " | ".join(buckets) + " |")
    print("| --- " * (len(buckets) + 1) + "|")
    for r in runs:
        print(f"| {r['world_seed']} | " + " | ".join(b["verdict"] for b in r["probe_by_timestep"]) + " |")


if __name__ == "__main__":
    main()
