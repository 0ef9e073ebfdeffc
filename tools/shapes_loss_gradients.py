"""How much of a fine-tuning update each loss term drives, on a finished (or stage-6-finished) shapes-world run.

    python tools/shapes_loss_gradients.py runs/shapes-depth --batches 8

From the stage-5 ControlNet, on fine-tuning batches drawn as stage 7 draws them (same batch size, timesteps and
noise as its seed 0), the gradient norm that each term of InnerControl's loss alone puts on the ControlNet's weights:
the diffusion loss, lambda_r x the reward loss and alpha x the alignment loss, each with the weights the run uses.
Also the cosine between each auxiliary term's gradient and the diffusion loss's. Prints mean ± std over batches.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import formats  # noqa: E402
import shapes  # noqa: E402
import train  # noqa: E402


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a shapes-world run folder whose stages 1-6 are done (runs/shapes-depth)")
    p.add_argument("--batches", type=int, default=8, help="fine-tuning batches to average over")
    p.add_argument("--seed", type=int, default=0, help="the fine-tuning seed whose batches are drawn")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="train.py flags (e.g. --alpha 2.0)")
    args = p.parse_args()
    with open(os.path.join(args.run, "data", "done.json")) as f:
        control = json.load(f)["settings"]["control"]
    P = shapes.preset()
    P["probe_loss"] = shapes.probe_loss(P, control)
    sd = formats.load_sd(os.path.join(args.run, "base", "sd.safetensors"))
    reward_model = shapes.load_annotators(args.run, P, control)[0]
    controlnet = formats.load_controlnet(os.path.join(args.run, "controlnet", "controlnet.safetensors"))
    probe = formats.load_probe(os.path.join(args.run, "probe", "probe.safetensors"))
    argv = ["--method", "innercontrol", "--control", control, "--resolution", str(P["size"]), "--device", "cpu",
            "--batch-size", str(P["finetune_batch"]), "--seed", str(shapes.world(P, args.seed))]
    targs = train.parse_args(argv + list(P["finetune_args"]) + args.flags)
    models = train.Models(targs, sd, controlnet, probe, reward_model,
                          annotator=reward_model if control != "depth" else None)
    dataset = data.ControlDataset(os.path.join(args.run, "data", "train"), P["size"],
                                  control_column=shapes.control_column(control))
    batches = iter(data.make_loader(dataset, targs.batch_size, seed=targs.seed, num_workers=0))
    params = [q for q in controlnet.parameters() if q.requires_grad]
    rows = []
    for step in range(args.batches):
        t = train.draw_timesteps(targs, step, targs.batch_size)
        counts = train.eligible_counts(targs, t)
        batch = next(batches)
        noise, latent_noise = train.draw_noise(targs, models, step, 0, 0, 1, len(batch["text"]))
        losses = train.training_step(models, batch, t, noise, latent_noise, targs, counts)
        grads = {k: flat_grad(v, params) for k, v in losses.items()}
        row = {f"|g_{k}|": g.norm().item() for k, g in grads.items()}
        row.update({f"loss_{k}": v.item() for k, v in losses.items()})
        for k in ("reward", "align"):
            denom = (grads[k].norm() * grads["diffusion"].norm()).clamp_min(1e-30)
            row[f"cos({k}, diffusion)"] = (grads[k] @ grads["diffusion"] / denom).item()
        rows.append(row)
        print(f"batch {step}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    print(f"\n{args.run}: {args.batches} batches of {targs.batch_size}, lambda_r {targs.lambda_reward}, "
          f"alpha {targs.alpha}")
    for k in rows[0]:
        values = np.array([r[k] for r in rows])
        print(f"  {k}: {values.mean():.4g} ± {values.std():.2g}")


if __name__ == "__main__":
    main()
