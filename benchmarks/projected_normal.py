"""Benchmark and demonstration: cryosvi.distributions vs pyro.distributions.ProjectedNormal.

Run:  python benchmarks/projected_normal.py [--n 1000000] [--reps 11] [--threads 1]
              [--device cpu] [--skip-speed] [--skip-figure] [--skip-svi]

1. Speed: log_prob + backward (gradients w.r.t. concentration and value) on n values
   of S^3, Pyro's and ours measured in the same process, interleaved round by round
   (so that load from other processes hits both alike); the reported time is the
   minimum over rounds (process CPU time when single-threaded, else wall time), the
   ratio ours / Pyro's.  The requirement is ratio <= 2.  Scenarios: per-value
   concentrations scoring their own samples (a guide in SVI), and one concentration
   scoring uniform values at |c| = 10 and 1000 (priors, Figure S1); float32/64.
   Default: one thread (--threads 1), whose CPU time does not depend on what else
   the (shared) machine runs; --threads 0 keeps torch's default and reports wall
   time, which on busy cores mostly measures how often a parallel region stalls.
2. Accuracy on the paper's Figure S1 setting: n uniform unit quaternions scored in
   float32 at concentrations 3.8 ... 1000; how many of Pyro's values are clamped
   (wrong by more than 1e-3), ours against float64 scoring of the same inputs.
3. SVI: fit a guide PN(c) to a concentrated target PN(200 mu) by maximising the ELBO,
   from a diffuse guide (|c| = 1, orthogonal to mu), with each implementation used
   for both model and guide; prints the learned |c|, its direction, the ELBO loss each
   implementation reports, and the exact KL(q || p) of the learned guide (scored
   with cryosvi's exact float64 log_prob).
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import pyro.distributions as pdist
import torch
from pyro.infer import SVI, Trace_ELBO

from cryosvi.distributions import AntipodalProjectedNormal, ProjectedNormal

IMPLEMENTATIONS = {"pyro": pdist.ProjectedNormal, "ours": ProjectedNormal,
                   "ours antipodal": AntipodalProjectedNormal}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scenarios(n, dtype, device, generator):
    """name -> (concentration, value), both requiring grad; value on S^3."""
    d = 4
    out = {}
    # guide scoring: per-value concentrations (|c| in 10 ... 100), values drawn from them
    c = torch.randn(n, d, generator=generator, dtype=dtype).to(device)
    c = c / c.norm(dim=-1, keepdim=True) * torch.empty(n, 1, dtype=dtype).uniform_(
        10, 100, generator=generator).to(device)
    v = pdist.ProjectedNormal(c).sample()
    out["per-value c, samples (|c| 10-100)"] = (c, v)
    u = torch.randn(n, d, generator=generator, dtype=dtype).to(device)
    u = u / u.norm(dim=-1, keepdim=True)
    mu = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=dtype, device=device)
    out["shared c, uniform values, |c| = 10"] = (10 * mu, u)
    out["shared c, uniform values, |c| = 1000"] = (1000 * mu, u)
    return out


def benchmark_speed(n, reps, device):
    threads = torch.get_num_threads()
    # With one thread the process CPU time is the time the work took, whatever else
    # the machine runs; with more threads only wall time is comparable.
    use_cpu = device.type == "cpu" and threads == 1
    clock = "CPU time" if use_cpu else "wall time"
    print(f"== log_prob + backward on {n:,} values of S^3 ({device}, {threads} thread"
          f"{'s' if threads > 1 else ''}); {clock}, min over {reps} interleaved rounds ==")
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype in (torch.float32, torch.float64):
        for name, (c0, v0) in _scenarios(n, dtype, device, g).items():
            times = {k: [] for k in IMPLEMENTATIONS}

            def run(cls):
                c = c0.detach().requires_grad_()
                v = v0.detach().requires_grad_()
                _sync(device)
                start = time.process_time() if use_cpu else time.perf_counter()
                lp = cls(c).log_prob(v)
                lp.sum().backward()
                _sync(device)
                return (time.process_time() if use_cpu else time.perf_counter()) - start

            for cls in IMPLEMENTATIONS.values():  # warm-up
                run(cls)
            for _ in range(reps):
                for key, cls in IMPLEMENTATIONS.items():
                    times[key].append(run(cls))
            best = {k: min(t) * 1e3 for k, t in times.items()}
            ratio = best["ours"] / best["pyro"]
            ratio_anti = best["ours antipodal"] / best["pyro"]
            worst = max(worst, ratio, ratio_anti)
            print(f"{str(dtype)[6:]:8s} {name:38s} pyro {best['pyro']:7.1f} ms   "
                  f"ours {best['ours']:7.1f} ms (x{ratio:.2f})   "
                  f"antipodal {best['ours antipodal']:7.1f} ms (x{ratio_anti:.2f})")
    print(f"worst ratio ours / pyro: {worst:.2f} (requirement: <= 2)\n")
    return worst


def figure_s1(n, device):
    print(f"== Figure S1: {n:,} uniform unit quaternions scored in float32 ==")
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(n, 4, device=device), dim=-1)
    mu = torch.tensor([1.0, 0.0, 0.0, 0.0], device=device)
    for kappa in [3.8, 10.0, 30.0, 100.0, 300.0, 1000.0]:
        exact = ProjectedNormal((kappa * mu).double(), validate_args=False).log_prob(u.double())
        ours = ProjectedNormal(kappa * mu).log_prob(u)
        theirs = pdist.ProjectedNormal(kappa * mu).log_prob(u)

        def bad(x):
            err = (x.double() - exact).abs() / exact.abs().clamp(min=1.0)
            return (~torch.isfinite(x)).sum().item() + (err > 1e-3).sum().item()

        ours_err = ((ours.double() - exact).abs() / exact.abs().clamp(min=1.0)).max().item()
        print(f"|c| = {kappa:6.1f}: exact min {exact.min().item():12.2f}   "
              f"pyro min {theirs.min().item():8.2f}, wrong {bad(theirs) / n:6.1%}   "
              f"ours wrong {bad(ours) / n:4.1%} (max rel. err. {ours_err:.1e})")
    print()


def fit(cls, seed=0, steps=((250, 0.1), (100, 0.01)), particles=128):
    """Reverse-KL fit of PN(c) to PN(200 mu) with Pyro's SVI; returns (|c|, cos, loss, c)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    mu = torch.tensor([1.0, 0.0, 0.0, 0.0])

    def model():
        pyro.sample("q", cls(200.0 * mu))

    def guide():
        u = pyro.param("direction", torch.tensor([0.0, 1.0, 0.0, 0.0]))
        log_kappa = pyro.param("log_kappa", torch.tensor(0.0))
        pyro.sample("q", cls(log_kappa.exp() * u / u.norm()))

    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
    loss = math.nan
    for n_steps, lr in steps:
        svi = SVI(model, guide, pyro.optim.Adam({"lr": lr, "betas": (0.9, 0.9)}), elbo)
        for _ in range(n_steps):
            loss = svi.step()
    u = pyro.param("direction").detach()
    kappa = pyro.param("log_kappa").exp().item()
    return kappa, (u / u.norm() @ mu).item(), loss, kappa * u / u.norm()


def exact_kl(c, target, antipodal=False, n=100_000):
    """KL(PN(c) || PN(target)) by Monte Carlo with cryosvi's exact float64 log_prob."""
    cls = AntipodalProjectedNormal if antipodal else ProjectedNormal
    q, p = cls(c.double()), cls(target.double())
    v = q.sample((n,))
    return (q.log_prob(v) - p.log_prob(v)).mean().item()


def svi_side_by_side(seeds=3):
    print("== SVI: fit PN(c) to PN(200 mu) from |c| = 1 orthogonal to mu (ELBO, "
          "128 particles, Adam) ==")
    target = torch.tensor([200.0, 0.0, 0.0, 0.0])
    for name, cls in IMPLEMENTATIONS.items():
        for seed in range(seeds):
            start = time.perf_counter()
            kappa, cos, loss, c = fit(cls, seed)
            kl = exact_kl(c, target, antipodal=cls is AntipodalProjectedNormal)
            print(f"{name:15s} seed {seed}: learned |c| {kappa:7.2f} (truth 200), "
                  f"cos to mode {cos:+.4f}, reported loss {loss:8.3f}, "
                  f"exact KL {kl:10.3f}  ({time.perf_counter() - start:.1f} s)")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: on a shared machine, "
                             "single-threaded CPU time is the reproducible measure; "
                             "0 keeps torch's default)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-svi", action="store_true")
    parser.add_argument("--skip-figure", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}\n")
    if not args.skip_speed:
        benchmark_speed(args.n, args.reps, device)
    if not args.skip_figure:
        figure_s1(args.n, device)
    if not args.skip_svi:
        svi_side_by_side()


if __name__ == "__main__":
    main()
