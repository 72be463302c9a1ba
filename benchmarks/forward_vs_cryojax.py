"""Projection + CTF in cryosvi and in cryojax 0.6, timed in one run.

The paper's Table 1 setting: 1OL5 chain A at stride 2 (133 Gaussian pseudo-atoms, sigma
2 Å), 128 px of 1 Å, batch 1 000, zero-padding to 256 px for the CTF (pad factor 2 in
both codes), 300 kV, Cs 2.7 mm, amplitude contrast 0.1, random poses and defocus
10 000 +- 2 500 Å, float32.

cryosvi: ``rotate`` + ``project`` (window 12 px, the Table 1 setting) + ``apply_ctf``.
cryojax (``pip install cryojax==0.6.0``; never imported by the package): one image
model per particle (``make_image_model`` with a ``GaussianMixtureVolume``, a
``QuaternionPose``, ``ContrastTransferTheory(AstigmaticCTF)``, ``BasicImageConfig``
with ``padded_shape`` 256 x 256 and ``translate_mode="none"``), ``jax.vmap`` over the
batch, ``jax.jit``; its projector ``GaussianMixtureProjection(shape=(128, 128),
sampling_mode="point")`` projects on the 128 px plane and zero-pads (as cryosvi does),
either dense (every atom on every pixel, exact) or spreading each atom over its 12
nearest pixels per axis (``n_spread=12``, the analogue of cryosvi's window). Both are
timed; the ratio uses the faster one.

Conventions, checked on four particles before timing (``agreement``): cryojax's
Gaussians are normalised densities (amplitude 2 pi sigma^2 gives cryosvi's unit peak),
its quaternion pose rotates the atoms as cryosvi's does (same q), and its CTF has the
opposite overall sign (cryosvi follows RELION).

Timing: every method once to compile / warm up, then ``--rounds`` rounds, the methods
interleaved within each round so that load from other processes hits them alike; min
and median per method, of the wall time and of the process's CPU time
(``time.process_time``: on a shared machine it does not count the time other processes
hold the core, and with one thread per code it is the work done); JAX results are
``block_until_ready``. The minor page faults of each call are recorded too: a fresh
65 MB output costs 16 000 of them (~20 us per image here), and glibc's heap trimming
can add as many again, depending on the process's allocation history. Threads: ``--threads N``
sets torch's intra-op threads and XLA's CPU intra-op threads
(``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` for one thread,
set before JAX is imported).

    python benchmarks/forward_vs_cryojax.py --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--json", default=None, help="default: benchmarks/results/cryojax/"
                        "table1_<threads>thread[_cli_allocator].json")
    parser.add_argument("--cli-allocator", action="store_true",
                        help="set glibc's allocator as cryosvi's train/infer/demo commands "
                        "do (cryosvi.cli.main.keep_freed_memory: large blocks from the "
                        "heap, freed memory kept), before anything is allocated")
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.cli_allocator:
    from cryosvi.cli.main import keep_freed_memory

    keep_freed_memory()
if ARGS.threads == 1:
    os.environ["XLA_FLAGS"] = ("--xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1")
else:
    os.environ["XLA_FLAGS"] = f"intra_op_parallelism_threads={ARGS.threads}"

import cryojax  # noqa: E402
import cryojax.simulator as cxs  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cryosvi import bench  # noqa: E402
from cryosvi.config import Optics  # noqa: E402
from cryosvi.physics.ctf import apply_ctf  # noqa: E402
from cryosvi.io.atomic import write_atomically  # noqa: E402
from cryosvi.physics.projection import project  # noqa: E402
from cryosvi.physics.rotations import quaternion_to_matrix, random_quaternions, rotate  # noqa: E402

SIGMA, PIXEL, WINDOW, PAD = 2.0, 1.0, 12, 2
VOLTAGE, CS, AMPLITUDE_CONTRAST = 300.0, 2.7, 0.1


class Problem:
    """Atoms, poses and defocus of one batch, for both codes."""

    def __init__(self, batch: int, box: int, seed: int = 0):
        coords, self.source = bench.structure_coords(bench.TABLE1, torch.Generator())
        self.coords = (coords - coords.mean(0)).float()  # (N, 3) Å, centred
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.quaternions = random_quaternions(batch)  # (B, 4) w x y z
        self.defocus = (10000 + 2500 * torch.randn(batch, generator=generator)).clamp_min(
            2000.0)  # (B,) Å
        self.box = box
        self.optics = Optics(box=box, pixel_size=PIXEL, voltage=VOLTAGE,
                             spherical_aberration=CS, amplitude_contrast=AMPLITUDE_CONTRAST)


# ------------------------------------------------------------------------- cryosvi
def cryosvi_functions(problem: Problem, window: int = WINDOW):
    coords = problem.coords.expand(len(problem.quaternions), -1, -1)
    matrices = quaternion_to_matrix(problem.quaternions)
    zero = torch.zeros_like(problem.defocus)

    @torch.no_grad()
    def projection():
        return project(rotate(coords, matrices), problem.box, PIXEL, SIGMA, window)

    images = projection()

    @torch.no_grad()
    def ctf():
        return apply_ctf(images, problem.defocus, problem.defocus, zero, problem.optics, PAD)

    @torch.no_grad()
    def both():
        return apply_ctf(projection(), problem.defocus, problem.defocus, zero,
                         problem.optics, PAD)

    return {"projection": projection, "ctf": ctf, "projection+ctf": both}


# ------------------------------------------------------------------------- cryojax
def cryojax_functions(problem: Problem, n_spread: int | None):
    """jit(vmap(...)) of cryojax's image model, and of its projection alone (the same
    integrator on the unpadded 128 px plane, real space)."""
    box = problem.box
    volume = cxs.GaussianMixtureVolume(jnp.asarray(problem.coords.numpy()),
                                       2 * math.pi * SIGMA ** 2, SIGMA ** 2)
    padded = cxs.BasicImageConfig((box, box), PIXEL, VOLTAGE, padded_shape=(PAD * box,) * 2,
                                  precompute_mode="rfft")
    plain = cxs.BasicImageConfig((box, box), PIXEL, VOLTAGE, precompute_mode="rfft")
    integrator = cxs.GaussianMixtureProjection(shape=(box, box), sampling_mode="point",
                                               n_spread=n_spread)

    def simulate(wxyz, defocus):
        transfer = cxs.ContrastTransferTheory(
            cxs.AstigmaticCTF(defocus_in_angstroms=defocus, spherical_aberration_in_mm=CS),
            amplitude_contrast_ratio=AMPLITUDE_CONTRAST)
        model = cxs.make_image_model(volume, padded, cxs.QuaternionPose(wxyz=wxyz), transfer,
                                     integrator, translate_mode="none")
        return model.simulate()

    def projection(wxyz):
        rotated = volume.rotate_to_pose(cxs.QuaternionPose(wxyz=wxyz))
        return integrator.integrate(rotated, plain, outputs_real_space=True)

    both, alone = jax.jit(jax.vmap(simulate)), jax.jit(jax.vmap(projection))
    wxyz = jnp.asarray(problem.quaternions.numpy())
    defocus = jnp.asarray(problem.defocus.numpy())
    return {"projection": lambda: alone(wxyz).block_until_ready(),
            "projection+ctf": lambda: both(wxyz, defocus).block_until_ready()}


# ----------------------------------------------------------------------- agreement
def agreement() -> dict:
    """Four particles: cryojax's dense image vs cryosvi's with a 31 px window (no
    truncation to speak of), and the spreading variant vs cryosvi's 12 px window; the
    largest difference over the largest value of cryosvi's image, after flipping the
    sign of cryojax's CTF."""
    problem = Problem(4, ARGS.box, seed=1)
    out = {}
    for name, n_spread, window in (("dense_vs_window31", None, 31),
                                   ("spread12_vs_window12", 12, 12)):
        ours = cryosvi_functions(problem, window)
        theirs = cryojax_functions(problem, n_spread)
        for stage, sign in (("projection", 1.0), ("projection+ctf", -1.0)):
            a = ours[stage]().numpy()
            b = sign * np.asarray(theirs[stage]())
            out[f"{name}_{stage}"] = float(np.abs(a - b).max() / np.abs(a).max())
        # The sign: without the flip the images are each other's negatives.
        a, b = ours["projection+ctf"]().numpy(), np.asarray(theirs["projection+ctf"]())
        out[f"{name}_ctf_correlation_without_flip"] = float(
            np.corrcoef(a.ravel(), b.ravel())[0, 1])
    return out


# -------------------------------------------------------------------------- timing
def time_interleaved(functions: dict, rounds: int, settle: float = 0.2) -> dict:
    """{name: {"wall": [s], "cpu": [s], "thread": [s], "faults": [minor page faults]}} per
    call: wall time, the process's CPU time, the calling thread's CPU time, page faults.

    JAX's threads keep working after ``block_until_ready`` returns (about 40 us per image
    of CPU time after a cryojax batch, measured: freeing its buffers, waking pools), which
    used to land in the next method's timing (cryosvi's projection, timed right after
    cryojax, read 2x slow). So each call is followed by ``settle`` seconds of sleep, and
    its CPU time is read after them: background work is charged to the call that caused
    it, and starts no other call's clock."""
    for function in functions.values():  # compile, warm up
        function()
    samples = {name: {"wall": [], "cpu": [], "thread": [], "faults": []} for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
            function()
            samples[name]["wall"].append(time.perf_counter() - wall)
            samples[name]["thread"].append(time.thread_time() - thread)
            time.sleep(settle)
            samples[name]["cpu"].append(time.process_time() - cpu)
            samples[name]["faults"].append(
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return samples


def main() -> int:
    torch.set_num_threads(ARGS.threads)
    load_start = os.getloadavg()
    checks = agreement()
    problem = Problem(ARGS.batch, ARGS.box)
    functions = {f"cryosvi {k}": v for k, v in cryosvi_functions(problem).items()}
    for label, n_spread in (("cryojax dense", None), ("cryojax spread12", 12)):
        functions.update({f"{label} {k}": v
                          for k, v in cryojax_functions(problem, n_spread).items()})
    samples = time_interleaved(functions, ARGS.rounds)
    per_image = {}
    for name, s in samples.items():
        per_image[name] = {"min_us": min(s["wall"]) / ARGS.batch * 1e6,
                           "median_us": statistics.median(s["wall"]) / ARGS.batch * 1e6,
                           "cpu_min_us": min(s["cpu"]) / ARGS.batch * 1e6,
                           "cpu_median_us": statistics.median(s["cpu"]) / ARGS.batch * 1e6,
                           "thread_cpu_min_us": min(s["thread"]) / ARGS.batch * 1e6,
                           "page_faults_median": statistics.median(s["faults"])}
    ratios = {}
    for stage in ("projection", "projection+ctf"):
        for stat in ("min_us", "median_us", "cpu_min_us", "cpu_median_us"):
            peer = min(per_image[f"cryojax dense {stage}"][stat],
                       per_image[f"cryojax spread12 {stage}"][stat])
            ratios[f"{stage} ({stat[:-3]})"] = peer / per_image[f"cryosvi {stage}"][stat]
    report = {
        "what": "projection + CTF, cryosvi vs cryojax 0.6, same run, interleaved rounds",
        "setting": {"atoms": int(problem.coords.shape[0]), "structure": problem.source,
                    "box": ARGS.box, "pixel_size": PIXEL, "sigma": SIGMA, "window": WINDOW,
                    "pad_factor": PAD, "batch": ARGS.batch, "dtype": "float32",
                    "rounds": ARGS.rounds},
        "environment": {"threads": ARGS.threads, "torch_threads": torch.get_num_threads(),
                        "cli_allocator": ARGS.cli_allocator,
                        "XLA_FLAGS": os.environ["XLA_FLAGS"], "torch": torch.__version__,
                        "jax": jax.__version__, "cryojax": cryojax.__version__,
                        "jax_devices": [str(d) for d in jax.devices()],
                        "cpu_count": os.cpu_count(), "machine": platform.machine(),
                        "load_average_start": load_start,
                        "load_average_end": os.getloadavg()},
        "agreement_max_relative_difference": checks,
        "us_per_image": per_image,
        "speedup_vs_faster_cryojax": ratios,
    }
    suffix = "_cli_allocator" if ARGS.cli_allocator else ""
    path = Path(ARGS.json or Path(__file__).parent / "results" / "cryojax" /
                f"table1_{ARGS.threads}thread{suffix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text))
    print(f"{'us per image':<36}{'wall min':>10}{'median':>10}{'cpu min':>10}{'median':>10}"
          f"{'thread':>10}{'faults':>10}")
    for name, v in per_image.items():
        print(f"{name:<36}{v['min_us']:>10.1f}{v['median_us']:>10.1f}{v['cpu_min_us']:>10.1f}"
              f"{v['cpu_median_us']:>10.1f}{v['thread_cpu_min_us']:>10.1f}"
              f"{v['page_faults_median']:>10.0f}")
    for name, value in ratios.items():
        print(f"cryojax (faster variant) / cryosvi, {name}: {value:.2f}x")
    print("agreement:", json.dumps(checks))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
