"""Does the amortized guide carry the pose when it sees more simulations?

Trains guides by simulation (the ``sim`` objective: -log q(z_true | x) on fresh draws from
the model, paper preset, SNR 20, pose + defocus + mode) for a fixed wall-time budget per
architecture, then scores the guide ALONE (one network pass, no refinement) on 2 000
held-out simulated particles: pose median / p90 error, defocus and mode Pearson r and
95 % coverage. Meant for a GPU (the CPU demo sees 4e5 simulated particles; here each
variant sees tens of millions).

    python benchmarks/guide_scaling.py --device cuda --seconds 150 --json out.json

Prints one line per variant and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict

import numpy as np
import torch
from scipy import stats

from cryosvi.config import PAPER_PRESET
from cryosvi.guide import ORDER, Architecture, Guide, GuideConfig
from cryosvi.latents import guide_priors
from cryosvi.posterior import posterior_summary
from cryosvi.reference import build_reference
from cryosvi.physics.rotations import quaternion_geodesic_angle
from cryosvi.model import sample_prior
from cryosvi.training.schedule import FROZEN_NORM_FRACTION


VARIANTS = {
    # the default layout (BatchNorm, gated conditioning)
    "default": Architecture(),
    # the default before commit f292fb5 (2026-11-30), named "demo" in the H200 results
    "additive": Architecture(batch_norm=False, gated_conditioning=False),
    # the H200 results' wide guide (as measured there: no BatchNorm, additive conditioning)
    "wide8": Architecture(channels=(32, 64, 128), hidden=512, n_components=8,
                          batch_norm=False, gated_conditioning=False),
}


def draw(reference, forward, noise_std, n, generator_seed=None):
    if generator_seed is not None:
        devices = [forward.coords.device] if forward.coords.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(generator_seed)
            return draw(reference, forward, noise_std, n)
    with torch.no_grad():
        latents, clean = sample_prior(forward, reference.priors, n)
        return latents, clean + noise_std * torch.randn_like(clean)


def score(guide, latents, images) -> dict:
    guide.eval()
    out = {}
    parts = [posterior_summary(guide, images[i:i + 500], {}, 64)
             for i in range(0, len(images), 500)]
    summary = {k: torch.cat([p[k] for p in parts]) for k in
               ("defocus_mean", "defocus_std", "modes_mean", "modes_std",
                "rotation_mean", "pose_std_deg")}
    error = quaternion_geodesic_angle(summary["rotation_mean"],
                                      latents["rotation"]).cpu().numpy()  # degrees
    out["pose_median_deg"] = float(np.median(error))
    out["pose_p90_deg"] = float(np.percentile(error, 90))
    radius = stats.chi(3).ppf(0.95)
    out["pose_cov95"] = float(np.mean(error <= radius * summary["pose_std_deg"].cpu().numpy()))
    for name, mean, std, truth in (
            ("defocus", summary["defocus_mean"], summary["defocus_std"], latents["defocus"]),
            ("mode", summary["modes_mean"][:, 0], summary["modes_std"][:, 0],
             latents["enm_scale"][:, 0])):
        m, s, t = (x.double().cpu().numpy() for x in (mean, std, truth))
        out[f"{name}_r"] = float(np.corrcoef(m, t)[0, 1])
        out[f"{name}_cov95"] = float(np.mean(np.abs(m - t) <= 1.96 * s))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=150.0, help="training wall time "
                        "per variant (default: 150)")
    parser.add_argument("--batch-size", type=int, default=512, help="(default: 512)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr (default: 1e-3)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = PAPER_PRESET
    reference = build_reference(None, None, 2, preset["optics"], preset["imaging"],
                                preset["priors"], preset["noise"])
    forward = reference.forward_model().to(device)
    torch.manual_seed(0)
    _, clean = draw(reference, forward, 0.0, 4096)
    noise_std = math.sqrt(float(clean.var()) / preset["noise"].snr)
    input_scale = math.sqrt(float(clean.var()) + noise_std**2)
    test_latents, test_images = draw(reference, forward, noise_std, 2000, generator_seed=12345)
    results = {"device": str(device), "seconds_per_variant": args.seconds,
               "batch_size": args.batch_size, "noise_std": noise_std, "variants": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for name in args.variants.split(","):
        torch.manual_seed(1)
        config = GuideConfig(**asdict(VARIANTS[name]), box=reference.optics.box, n_modes=1,
                             latents=ORDER,
                             latent_priors=guide_priors(reference.priors, False),
                             input_scale=input_scale,
                             optics=asdict(reference.optics))
        guide = Guide(config).to(device)
        optimizer = torch.optim.Adam(guide.parameters(), lr=args.lr)
        start, steps, losses = time.perf_counter(), 0, []
        while (elapsed := time.perf_counter() - start) < args.seconds:
            fraction = min(elapsed / args.seconds, 1.0)
            warm = min(1.0, (steps + 1) / 200)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * warm * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi
                                                                               * fraction)))
            latents, images = draw(reference, forward, noise_std, args.batch_size)
            guide.train()
            if fraction >= 1 - FROZEN_NORM_FRACTION:  # as cryosvi train does
                guide.freeze_batch_norm()
            log_q = guide.log_prob(images, latents)
            loss = -sum(v.mean() for v in log_q.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(guide.parameters(), 10.0)
            optimizer.step()
            steps += 1
            losses.append(float(loss.detach()) if steps % 50 == 0 else None)
        metrics = score(guide, test_latents, test_images)
        record = {"architecture": asdict(VARIANTS[name]), "parameters":
                  guide.parameter_count(), "steps": steps,
                  "simulated_particles": steps * args.batch_size,
                  "final_loss": next(v for v in reversed(losses) if v is not None)
                  if any(v is not None for v in losses) else None, **metrics}
        results["variants"][name] = record
        print(name, json.dumps(record), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
