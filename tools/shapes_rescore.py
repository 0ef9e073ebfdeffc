"""Score a finished shapes-world run's fine-tuned ControlNets on a new, larger held-out set.

    python tools/shapes_rescore.py runs/shapes-depth --scenes 512 --seed 3

The default run evaluates on 128 held-out scenes, and the paired interval between two methods is set mostly by
how much the scenes differ. This renders `--scenes` new scenes from another seed (training uses 1, the run's
held-out set 2), generates them with every fine-tuned ControlNet in RUN/finetune (the same noise for every one),
scores them with the run's evaluator and prints the paired differences, as the run's own table does.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shapes  # noqa: E402
import shapes_render  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a finished shapes-world run folder (runs/shapes-depth)")
    p.add_argument("--scenes", type=int, default=512)
    p.add_argument("--seed", type=int, default=3, help="render seed of the new scenes (not 1 or 2: those are the run's)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    results = os.path.join(args.run, "results.json")
    if not os.path.exists(results):
        sys.exit(f"shapes_rescore.py: error: {results} not found; finish the run first (python shapes.py --control ...)")
    with open(results) as f:
        done = json.load(f)
    P, control = done["preset"], done["control"]
    P.setdefault("world_seed", 0)  # runs from before the preset had it
    if args.seed in (shapes.world(P, 1), shapes.world(P, 2)):
        sys.exit(f"shapes_rescore.py: error: seed {args.seed} renders the run's own training or held-out scenes; "
                 "pick another")
    P["device"] = "cpu"
    scenes_dir = os.path.join(args.run, f"rescore-{args.scenes}-seed{args.seed}")
    if not os.path.exists(os.path.join(scenes_dir, "metadata.jsonl")):
        shapes_render.write_shapes_dataset(scenes_dir, args.scenes, seed=args.seed, size=P["size"], control=control,
                                           num_workers=args.workers if args.scenes >= 200 else 0)
    images, truths, _, texts = shapes.load_arrays(scenes_dir, control, P["size"])
    reward_model, evaluator = shapes.load_annotators(args.run, P, control)
    cond, label, real_features = shapes.eval_inputs(control, reward_model, evaluator, images, truths)
    runs = [(m, s) for m in shapes.METHODS for s in P["seeds"]]
    paths = [os.path.join(args.run, "finetune", f"{m}-seed{s}", "controlnet.safetensors") for m, s in runs]
    print(f"{len(runs)} ControlNets on {args.scenes} scenes in {args.workers} worker processes", flush=True)
    out = shapes.Workers(args.workers, [(shapes.evaluate_one, (args.run, P, control, path, texts, cond, label,
                                                                real_features)) for path in paths],
                         [os.path.join(scenes_dir, "console.txt")] * len(runs),
                         [f"{shapes.NAMES[m]}, seed {s}" for m, s in runs]).wait()
    per = {m: [out[i][1].tolist() for i, (mm, _) in enumerate(runs) if mm == m] for m in shapes.METHODS}
    for m in shapes.METHODS:
        print(f"{shapes.NAMES[m]}: {np.mean(per[m]):.3f} (per seed {', '.join(f'{x:.2f}' for x in np.mean(per[m], 1))})")
    for p in shapes.paired_table(per, control):
        print(f"{p['pair']}: {p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]"
              + (f" significant, {p['better']} is better" if p["significant"] else " not significant"))
    with open(os.path.join(scenes_dir, "scores.json"), "w") as f:
        json.dump(per, f)


if __name__ == "__main__":
    main()
