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
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as evaluation  # noqa: E402
import reward  # noqa: E402
import shapes  # noqa: E402
import shapes_render  # noqa: E402


def score(root, scenes_dir, P, control, path):
    """Per-scene controllability of the ControlNet at `path` on the scenes in scenes_dir (one worker process)."""
    torch.set_num_threads(1)
    images, truths, _, texts = shapes.load_arrays(scenes_dir, control, P["size"])
    reward_model, evaluator = shapes.load_annotators(root, P, control)
    depth = truths if control == "depth" else None
    cond = reward.control_image(control, reward.make_label(control, reward_model, (images + 1) / 2, depth), depth)
    label = evaluation.eval_label(control, evaluator, (images + 1) / 2, depth)
    real = evaluation.evaluator_features(evaluator, (images + 1) / 2)
    return shapes.evaluate_one(root, P, control, path, texts, cond, label, real)[1].tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a finished shapes-world run folder (runs/shapes-depth)")
    p.add_argument("--scenes", type=int, default=512)
    p.add_argument("--seed", type=int, default=3, help="render seed of the new scenes (not 1 or 2: those are the run's)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    results = os.path.join(args.run, "results.json")
    if not os.path.exists(results):
        sys.exit(f"shapes_rescore.py: error: {results} not found; finish the run first (python train.py --control ...)")
    if args.seed in (1, 2):
        sys.exit("shapes_rescore.py: error: seeds 1 and 2 render the run's own training and held-out scenes; pick another")
    with open(results) as f:
        done = json.load(f)
    P, control = done["preset"], done["control"]
    P["device"] = "cpu"
    scenes_dir = os.path.join(args.run, f"rescore-{args.scenes}-seed{args.seed}")
    if not os.path.exists(os.path.join(scenes_dir, "metadata.jsonl")):
        shapes_render.write_shapes_dataset(scenes_dir, args.scenes, seed=args.seed, size=P["size"], control=control,
                                           num_workers=args.workers if args.scenes >= 200 else 0)
    runs = [(m, s) for m in shapes.METHODS for s in P["seeds"]]
    paths = [os.path.join(args.run, "finetune", f"{m}-seed{s}", "controlnet.safetensors") for m, s in runs]
    print(f"{len(runs)} ControlNets on {args.scenes} scenes in {args.workers} worker processes", flush=True)
    with ProcessPoolExecutor(args.workers) as ex:
        out = list(ex.map(score, *zip(*[(args.run, scenes_dir, P, control, path) for path in paths])))
    per = {m: [out[i] for i, (mm, _) in enumerate(runs) if mm == m] for m in shapes.METHODS}
    for m in shapes.METHODS:
        print(f"{shapes.NAMES[m]}: {np.mean(per[m]):.3f} (per seed {', '.join(f'{x:.2f}' for x in np.mean(per[m], 1))})")
    for a, b in (("controlnet++", "controlnet"), ("innercontrol", "controlnet"), ("innercontrol", "controlnet++")):
        mean, lo, hi = shapes.paired_difference(per[a], per[b])
        print(f"{shapes.NAMES[a]} - {shapes.NAMES[b]}: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
              f"{' significant' if lo > 0 or hi < 0 else ''}")
    with open(os.path.join(scenes_dir, "scores.json"), "w") as f:
        json.dump(per, f)


if __name__ == "__main__":
    main()
