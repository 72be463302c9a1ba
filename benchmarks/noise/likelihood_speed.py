"""The cost of the coloured-noise likelihood against today's white Normal, same run.

    PYTHONPATH=src python benchmarks/noise/likelihood_speed.py [--batch 256] [--box 64]
        [--threads 1] [--device cpu]

Times, on float32 images (B, L, L) and clean images that need gradients (as in SVI and
Gauss-Newton): ``Normal(clean, s).to_event(2).log_prob`` (today), the NoiseModel's
contrast-marginal ``log_likelihood`` and its Gauss-Newton ``residuals``, each forward
and forward + backward; prints milliseconds per call and the ratio to today's.
"""

from __future__ import annotations

import argparse
import time

import pyro.distributions as dist
import torch

from cryosvi.physics.noise import NoiseModel
from cryosvi.physics.spectrum import coloured_spectrum


def timed(function, repeats: int, device) -> float:
    function()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.box, args.box)
    clean = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    images = (clean.detach() + torch.randn(shape, generator=g).to(device))
    noise = NoiseModel(args.box, 2.0, coloured_spectrum(args.box, 3.0, 0.05, 0.4)[None],
                       contrast_std=0.25, contrast_floor=0.5).to(device)
    group = torch.zeros(args.batch, dtype=torch.long, device=device)
    paths = {
        "Normal(clean, s) (today)": lambda: dist.Normal(clean, 1.0).to_event(2).log_prob(images),
        "NoiseModel.log_likelihood": lambda: noise.log_likelihood(images, clean, group),
        "NoiseModel.residuals (|r|^2/2)": lambda: 0.5 * noise.residuals(images, clean, group)
        .square().sum(-1),
    }
    print(f"{args.batch} x {args.box}^2 float32 on {device}, {args.threads} thread(s)")
    base = {}
    for name, path in paths.items():
        forward = timed(lambda: path().sum().item(), args.repeats, device)

        def both():
            clean.grad = None
            path().sum().backward()

        backward = timed(both, args.repeats, device)
        base.setdefault("f", forward)
        base.setdefault("b", backward)
        print(f"{name:34s} forward {forward:7.2f} ms ({forward / base['f']:4.1f}x)   "
              f"+ backward {backward:7.2f} ms ({backward / base['b']:4.1f}x)")


if __name__ == "__main__":
    main()
