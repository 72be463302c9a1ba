"""``cryosvi bench``: the forward model timed stage by stage, against the paper's kernels.

Every SVI step runs the forward model (normal-mode displacement -> rotation ->
projection -> CTF -> noise), so its speed bounds training. This module times each stage
in microseconds per image at the paper's Table 1 settings (1OL5 at stride 2 = 133
pseudo-atoms, 128 px, sigma 2 px, window 12 px, batch 1000) and at a large setting
(10^4 atoms, 512 px, batch 64), next to baselines timed in the same run:

* projection: a faithful reimplementation of the paper's sparse-COO splat
  (``sparse_coo_projection``): precomputed pixel offsets around each atom, one per-pixel
  2D Gaussian value per (atom, pixel), an uncoalesced ``torch.sparse_coo_tensor`` with
  repeated indices, densified;
* CTF: a plain zero-padded FFT (``fft_ctf_baseline``): explicit centred padding, full
  complex ``fft2``, the CTF evaluated on the full grid at every call, ``ifft2``, crop.

Timing: each stage runs once to warm up, then the stages are timed in turn, round after
round (so that a change in machine load hits the baselines and the new kernels alike),
and the best round counts; fast stages get extra rounds up to 2 s each. CUDA work is
synchronised before each clock read. On a CPU shared with other busy processes,
multi-threaded timings are unreliable (OpenMP threads wait at every parallel region for
a thread that has been descheduled, which hurts kernels made of many short operations
the most); ``--threads 1`` gives a fairer comparison there.
Memory: the peak of each stage's warm-up call (CUDA: ``max_memory_allocated``; CPU: the
process RSS polled every millisecond, above its level before the call).
"""

from __future__ import annotations

import math
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor

from cryosvi.config import PAPER_PRESET, Imaging, Optics
from cryosvi.physics.ctf import apply_ctf
from cryosvi.physics.optics import electron_wavelength
from cryosvi.physics.forward import ForwardModel, deform
from cryosvi.guide import PAPER_ARCHITECTURE, GuideConfig, build_guide
from cryosvi.latents import guide_priors
from cryosvi.physics.projection import choose_method, project
from cryosvi.physics.rotations import quaternion_to_matrix, rotate
from cryosvi.physics.structure import default_structure_path, load_pseudo_atoms


@dataclass(frozen=True)
class Setting:
    """One benchmark size. Lengths in Å; sigma 2 Å at 1 Å pixels is Table 1's 2 px."""

    name: str
    n_atoms: int
    box: int
    batch: int
    pixel_size: float = 1.0
    sigma: float = 2.0
    window: int = 12
    n_modes: int = 1
    pad_factor: int = 2
    structure: str = "synthetic"  # "1ol5": the bundled 1OL5 chain A at stride 2
    baseline_backward: bool = True  # also time the baseline's backward pass
    baseline_batch: int | None = None  # run the baselines in sub-batches (memory only)

    def describe(self) -> str:
        return (f"{self.n_atoms} atoms, {self.box} px, sigma {self.sigma / self.pixel_size:g} px, "
                f"window {self.window} px, batch {self.batch}")


TABLE1 = Setting("table1", n_atoms=133, box=128, batch=1000, structure="1ol5")
# The baselines hold B N w^2 COO entries (several GiB here): they run 8 images at a time.
LARGE = Setting("large", n_atoms=10_000, box=512, batch=64, baseline_backward=False,
                baseline_batch=8)
TOY = Setting("toy", n_atoms=20, box=24, batch=4, window=6)
SETTINGS = {s.name: s for s in (TABLE1, LARGE, TOY)}

STAGES = (
    ("deform", "normal-mode displacement"),
    ("rotate", "rotation"),
    ("project", "projection"),
    ("ctf", "CTF"),
    ("noise", "noise"),
    ("forward", "whole forward model"),
    ("project_backward", "projection, forward + backward"),
    ("forward_backward", "whole model, forward + backward"),
)
BASELINES = {
    "project": ("project_baseline", "sparse COO"),
    "ctf": ("ctf_baseline", "plain FFT"),
    "project_backward": ("project_baseline_backward", "sparse COO"),
}


# ---------------------------------------------------------------------------- baselines
def sparse_coo_projection(coords: Tensor, box: int, pixel_size: float, sigma: float,
                          window: int) -> Tensor:
    """The paper's projection: per-pixel Gaussian values in an uncoalesced sparse COO
    tensor with repeated indices, densified. coords (B, N, 3) Å -> (B, box, box).

    Same pixels and values as ``projection.project`` (the ``window`` nearest pixels along
    each axis, unit peak); pixels outside the box get value 0 at a clamped index (an
    uncoalesced tensor sums duplicates, so this drops them without a boolean compaction).
    """
    n_images, n_atoms, _ = coords.shape
    steps = torch.arange(window, device=coords.device)
    offset_y, offset_x = (o.reshape(-1) for o in torch.meshgrid(steps, steps, indexing="ij"))
    centre = coords[..., :2] / pixel_size + box // 2  # (B, N, 2) pixel coordinates x, y
    start = torch.floor(centre + (1 - window / 2)).long()
    pixel_x = start[..., 0:1] + offset_x  # (B, N, w^2)
    pixel_y = start[..., 1:2] + offset_y
    distance_sq = (pixel_x - centre[..., 0:1]) ** 2 + (pixel_y - centre[..., 1:2]) ** 2
    values = torch.exp(-distance_sq * (pixel_size**2 / (2 * sigma**2)))
    inside = (pixel_x >= 0) & (pixel_x < box) & (pixel_y >= 0) & (pixel_y < box)
    values = values * inside
    image_index = torch.arange(n_images, device=coords.device).view(-1, 1, 1).expand_as(pixel_x)
    indices = torch.stack([image_index, pixel_y.clamp(0, box - 1), pixel_x.clamp(0, box - 1)])
    sparse = torch.sparse_coo_tensor(indices.reshape(3, -1), values.reshape(-1),
                                     (n_images, box, box), check_invariants=False)
    return sparse.to_dense()


def fft_ctf_baseline(images: Tensor, defocus: Tensor, optics: Optics,
                     pad_factor: int = 2) -> Tensor:
    """Plain CTF application: explicit centred zero padding, full complex FFT, the CTF
    (no astigmatism) evaluated on the full P x P grid at every call, inverse FFT, crop.
    images (B, L, L), defocus (B,) Å -> (B, L, L). Same formula and sign as ``ctf``."""
    size = images.shape[-1]
    padded = pad_factor * size
    before = (padded - size) // 2
    after = padded - size - before
    canvas = F.pad(images, (before, after, before, after))
    frequency = torch.fft.fftfreq(padded, d=optics.pixel_size, device=images.device,
                                  dtype=images.dtype)
    s2 = frequency[:, None] ** 2 + frequency[None, :] ** 2
    wavelength = electron_wavelength(optics.voltage)
    cs = optics.spherical_aberration * 1e7
    gamma = (-math.pi * wavelength * defocus[:, None, None] * s2
             + 0.5 * math.pi * cs * wavelength**3 * s2**2 - math.radians(optics.phase_shift))
    w = optics.amplitude_contrast
    ctf = w * torch.cos(gamma) - math.sqrt(1 - w * w) * torch.sin(gamma)
    if optics.bfactor:
        ctf = ctf * torch.exp(-optics.bfactor / 4 * s2)
    out = torch.fft.ifft2(torch.fft.fft2(canvas) * ctf).real
    return out[:, before:before + size, before:before + size]


def add_noise(clean: Tensor, std: float) -> Tensor:
    """White Gaussian noise of std ``std`` (units of the clean images)."""
    return clean + std * torch.randn_like(clean)


# ---------------------------------------------------------------------------- inputs
def synthetic_coords(n_atoms: int, generator: torch.Generator) -> Tensor:
    """(N, 3) Å, uniform in a ball of a protein's volume (~130 Å^3 per residue), centred."""
    radius = (3 * n_atoms * 130.0 / (4 * math.pi)) ** (1 / 3)
    direction = torch.randn(n_atoms, 3, generator=generator, dtype=torch.float64)
    direction /= direction.norm(dim=-1, keepdim=True)
    r = radius * torch.rand(n_atoms, 1, generator=generator, dtype=torch.float64) ** (1 / 3)
    coords = direction * r
    return coords - coords.mean(0)


def structure_coords(setting: Setting, generator: torch.Generator) -> tuple[Tensor, str]:
    """Pseudo-atoms for a setting: the bundled 1OL5 (chain A, stride 2: 133 atoms) when
    asked for, else a synthetic compact ball."""
    if setting.structure == "1ol5":
        atoms = load_pseudo_atoms(default_structure_path(), chain="A", stride=2)
        if atoms.n_atoms != setting.n_atoms:
            raise ValueError(f"setting {setting.name}: 1OL5 chain A at stride 2 has "
                             f"{atoms.n_atoms} atoms, not {setting.n_atoms}")
        return torch.as_tensor(atoms.coords), "1OL5 chain A, stride 2"
    return synthetic_coords(setting.n_atoms, generator), "synthetic compact ball"


def random_modes(n_modes: int, n_atoms: int, generator: torch.Generator) -> Tensor:
    """(K, N, 3) orthonormal 3N-vectors (timing does not depend on which modes)."""
    q, _ = torch.linalg.qr(torch.randn(3 * n_atoms, n_modes, generator=generator,
                                       dtype=torch.float64))
    return q.T.reshape(n_modes, n_atoms, 3)


def _rotate(atoms: Tensor, quaternions: Tensor) -> Tensor:
    return rotate(atoms, quaternion_to_matrix(quaternions))


# ---------------------------------------------------------------------------- timing
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _PeakMemory:
    """Peak extra memory of the enclosed code, bytes (None if it cannot be measured)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            _synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = _rss_bytes()
        self.highest = self.start
        self.stop = threading.Event()
        if self.start is not None:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.001):
            self.highest = max(self.highest, _rss_bytes() or 0)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            _synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.stop.set()
            self.thread.join()
            self.highest = max(self.highest, _rss_bytes() or 0)
            self.peak = self.highest - self.start
        return False


def _clock(function, device: torch.device, calls: int) -> float:
    """Seconds per call of ``calls`` back-to-back calls."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        function()
    _synchronize(device)
    return (time.perf_counter() - start) / calls


def time_stages(stages: dict, device: torch.device, rounds: int,
                min_seconds: float = 0.05, stage_seconds: float = 2.0,
                max_rounds: int = 30) -> dict:
    """Best seconds per call and peak memory of each stage (round-robin, see module notes).

    Each stage gets ``rounds`` rounds, and more (up to ``max_rounds``) while it has been
    timed for less than ``stage_seconds`` in all: on a shared machine the best of more
    rounds is a better estimate of the unhindered time. A round makes enough back-to-back
    calls to last ``min_seconds``.
    """
    results = {}
    for name, function in stages.items():
        with _PeakMemory(device) as memory:
            first = _clock(function, device, 1)
        results[name] = {"seconds": first, "peak_bytes": memory.peak, "rounds": 0,
                         "spent": 0.0,
                         "calls": max(1, min(100, math.ceil(min_seconds / max(first, 1e-9))))}
    for round_index in range(max(rounds, max_rounds)):
        for name, function in stages.items():
            result = results[name]
            if round_index >= rounds and result["spent"] >= stage_seconds:
                continue
            seconds = _clock(function, device, result["calls"])
            result["seconds"] = min(result["seconds"], seconds)
            result["spent"] += seconds * result["calls"]
            result["rounds"] += 1
    return results


# ---------------------------------------------------------------------------- settings
def build_stages(setting: Setting, device: torch.device, dtype=torch.float32,
                 seed: int = 0) -> tuple[dict, dict]:
    """Callables of every stage (and baseline) of ``setting``, and a description."""
    generator = torch.Generator().manual_seed(seed)
    coords, source = structure_coords(setting, generator)
    modes = random_modes(setting.n_modes, coords.shape[0], generator)
    optics = Optics(pixel_size=setting.pixel_size, box=setting.box)
    batch = setting.batch
    coords, modes = coords.to(device, dtype), modes.to(device, dtype)
    amplitudes = (2.0 * torch.randn(batch, setting.n_modes, generator=generator)).to(device, dtype)
    quaternions = torch.randn(batch, 4, generator=generator)
    quaternions = (quaternions / quaternions.norm(dim=-1, keepdim=True)).to(device, dtype)
    defocus = (10000 + 2500 * torch.randn(batch, generator=generator)).to(device, dtype)
    zero_angle = torch.zeros_like(defocus)

    atoms = deform(coords, modes, amplitudes)
    rotated = _rotate(atoms, quaternions)
    images = project(rotated, setting.box, setting.pixel_size, setting.sigma, setting.window)
    clean = apply_ctf(images, defocus, defocus, zero_angle, optics, setting.pad_factor)
    noise_std = float(clean.std()) / math.sqrt(PAPER_PRESET["noise"].snr)
    weights = torch.randn(batch, setting.box, setting.box, generator=generator).to(device, dtype)
    latents = tuple(x.clone().requires_grad_(True) for x in (amplitudes, quaternions, defocus))
    leaf = rotated.detach().clone().requires_grad_(True)

    def projection(x):
        return project(x, setting.box, setting.pixel_size, setting.sigma, setting.window)

    def in_pieces(function):
        """``function`` over sub-batches of ``setting.baseline_batch`` images."""
        step = setting.baseline_batch
        if step is None:
            return function
        return lambda first, *rest: torch.cat([
            function(first[i:i + step], *(r[i:i + step] for r in rest))
            for i in range(0, first.shape[0], step)])

    baseline_projection = in_pieces(lambda x: sparse_coo_projection(
        x, setting.box, setting.pixel_size, setting.sigma, setting.window))
    baseline_ctf = in_pieces(lambda x, d: fft_ctf_baseline(x, d, optics, setting.pad_factor))
    imaging = Imaging(sigma=setting.sigma, window=setting.window, pad_factor=setting.pad_factor)
    forward_model = ForwardModel(coords, modes, optics, imaging).to(device)

    def model(amplitudes, quaternions, defocus):
        """The whole forward model: the package's ForwardModel plus noise."""
        return add_noise(forward_model(amplitudes, quaternions, defocus), noise_std)

    def backward(function, *inputs):
        def run():
            (function(*inputs) * weights).sum().backward()
        return run

    stages = {
        "deform": lambda: deform(coords, modes, amplitudes),
        "rotate": lambda: _rotate(atoms, quaternions),
        "project": lambda: projection(rotated),
        "project_baseline": lambda: baseline_projection(rotated),
        "ctf": lambda: apply_ctf(images, defocus, defocus, zero_angle, optics,
                                 setting.pad_factor),
        "ctf_baseline": lambda: baseline_ctf(images, defocus),
        "noise": lambda: add_noise(clean, noise_std),
        "forward": lambda: model(amplitudes, quaternions, defocus),
    }
    # The forward stages run without autograd, as in simulation.
    stages = {name: torch.no_grad()(function) for name, function in stages.items()}
    stages["project_backward"] = backward(projection, leaf)
    if setting.baseline_backward:
        stages["project_baseline_backward"] = backward(baseline_projection, leaf)
    stages["forward_backward"] = backward(model, *latents)
    info = {"structure": source, "method": choose_method(coords.shape[0], setting.box,
                                                           setting.window, device),
            "noise_std": noise_std}
    return stages, info


def run_setting(setting: Setting, device: torch.device, rounds: int = 3,
                stage_seconds: float = 2.0) -> dict:
    """Microseconds per image of every stage of ``setting`` and the speed-ups."""
    stages, info = build_stages(setting, device)
    timings = time_stages(stages, device, rounds, stage_seconds=stage_seconds)
    per_image = {name: t["seconds"] / setting.batch * 1e6 for name, t in timings.items()}
    peak = {name: t["peak_bytes"] for name, t in timings.items()}
    speedups = {}
    for name, (baseline, _) in BASELINES.items():
        if baseline in per_image:
            speedups[name] = per_image[baseline] / per_image[name]
    # The yardstick for the whole model: baseline projection + FFT CTF + noise.
    baseline_model = per_image["project_baseline"] + per_image["ctf_baseline"] + per_image["noise"]
    per_image["forward_baseline"] = baseline_model
    speedups["forward"] = baseline_model / per_image["forward"]
    return {"setting": asdict(setting), "description": setting.describe(), **info,
            "us_per_image": per_image, "speedup": speedups, "peak_bytes": peak}


# ---------------------------------------------------------------------------- SVI step
def time_svi_step(device: torch.device, batch: int = 500, steps: int = 3,
                  box: int | None = None, seed: int = 0) -> dict:
    """Images per second of one full SVI step (Pyro model + guide, ELBO forward and
    backward, ClippedAdam update) at the paper's preset (1OL5 stride 2, box 32, sigma 2 Å,
    window 5 px, one mode; batch 500 as in the paper's schedule) with the paper's encoders
    (``cryosvi.guide.PAPER_ARCHITECTURE``)."""
    from cryosvi.training.objectives import elbo_loss

    preset = PAPER_PRESET
    optics, imaging, priors = preset["optics"], preset["imaging"], preset["priors"]
    if box is not None:
        optics = replace(optics, box=box)
    generator = torch.Generator().manual_seed(seed)
    coords, source = structure_coords(replace(TABLE1, structure="1ol5"), generator)
    modes = random_modes(priors.n_modes, coords.shape[0], generator)
    forward = ForwardModel(coords.float(), modes.float(), optics, imaging).to(device)
    with torch.no_grad():
        amplitudes = (torch.randn(batch, priors.n_modes, generator=generator)
                      * torch.tensor(priors.mode_std)).to(device)
        quaternions = torch.randn(batch, 4, generator=generator)
        quaternions = (quaternions / quaternions.norm(dim=-1, keepdim=True)).to(device)
        defocus = (priors.defocus_mean
                   + priors.defocus_std * torch.randn(batch, generator=generator)).to(device)
        clean = forward(amplitudes, quaternions, defocus)
        noise_std = float(clean.std()) / math.sqrt(preset["noise"].snr)
        images = clean + noise_std * torch.randn_like(clean)
    config = GuideConfig(**asdict(PAPER_ARCHITECTURE), box=optics.box, n_modes=priors.n_modes,
                         latent_priors=guide_priors(priors, False),
                         input_scale=float(images.std()),
                         optics=asdict(optics))
    guide = build_guide(config).to(device)
    optimizer = ClippedAdam(guide.parameters(), lr=5e-4)

    def step():
        loss = elbo_loss(guide, forward, priors, noise_std, images, {}, 10 * batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def model_only():
        latents = (amplitudes.clone().requires_grad_(True), quaternions,
                   defocus.clone().requires_grad_(True))
        forward(*latents).square().sum().backward()

    timings = time_stages({"svi_step": step, "model_forward_backward": model_only},
                          device, rounds=steps, min_seconds=0.0, stage_seconds=0.0)
    seconds = timings["svi_step"]["seconds"]
    return {"batch": batch, "box": optics.box, "structure": source,
            "n_atoms": int(coords.shape[0]), "seconds_per_step": seconds,
            "images_per_second": batch / seconds,
            "model_forward_backward_seconds": timings["model_forward_backward"]["seconds"],
            "guide_parameters": sum(p.numel() for p in guide.parameters())}


# ---------------------------------------------------------------------------- report
def environment(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(settings=("table1", "large"), device: str | torch.device = "cpu", rounds: int = 3,
        svi: bool = True, svi_batch: int = 500, stage_seconds: float = 2.0,
        progress=None) -> dict:
    """The whole benchmark: every setting named in ``settings``, then the SVI step."""
    device = torch.device(device)
    report = {"environment": environment(device), "settings": {}}
    for name in settings:
        if progress:
            progress(f"timing {name} ({SETTINGS[name].describe()}) ...")
        report["settings"][name] = run_setting(SETTINGS[name], device, rounds, stage_seconds)
    if svi:
        if progress:
            progress(f"timing one SVI step (paper preset, batch {svi_batch}) ...")
        report["svi"] = time_svi_step(device, batch=svi_batch)
    report["environment"]["load_average_end"] = (os.getloadavg() if hasattr(os, "getloadavg")
                                                 else None)
    return report


def _format_us(value: float) -> str:
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _format_bytes(value) -> str:
    return "" if value is None else f"{max(value, 0) / 2**20:,.0f} MiB"


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [f"cryosvi bench: {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
             f"{env['threads']} threads, torch {env['torch']}"]
    if env.get("load_average"):
        # Other processes on the same cores distort CPU timings: say how busy it was.
        end = env.get("load_average_end") or env["load_average"]
        lines[0] += (f"; load average {env['load_average'][0]:.1f} at start, {end[0]:.1f} "
                     f"at end on {env['cpu_count']} CPUs")
    for name, result in report["settings"].items():
        lines += ["", f"[{name}] {result['description']} ({result['structure']}; "
                      f"projection kernel: {result['method']})"]
        header = (f"  {'stage':<34}{'us/image':>11}{'baseline':>13}  {'':<15}{'speed-up':>9}"
                  f"{'peak mem':>11}")
        lines += [header, "  " + "-" * (len(header) - 2)]
        us, speedup, peak = result["us_per_image"], result["speedup"], result["peak_bytes"]
        for stage, label in STAGES:
            if stage not in us:
                continue
            base, base_label = "", ""
            if stage in BASELINES and BASELINES[stage][0] in us:
                base, base_label = _format_us(us[BASELINES[stage][0]]), BASELINES[stage][1]
            elif stage == "forward":
                base, base_label = _format_us(us["forward_baseline"]), "proj+CTF+noise"
            ratio = f"{speedup[stage]:.1f}x" if stage in speedup else ""
            lines.append(f"  {label:<34}{_format_us(us[stage]):>11}{base:>13}  "
                         f"{base_label:<15}{ratio:>9}{_format_bytes(peak.get(stage)):>11}")
    svi = report.get("svi")
    if svi is not None:
        lines.append("")
        lines.append(
            f"SVI step (paper preset: {svi['n_atoms']} atoms, {svi['box']} px, batch "
            f"{svi['batch']}; model + the paper's guide, forward + backward + ClippedAdam): "
            f"{svi['images_per_second']:,.0f} images/s ({svi['seconds_per_step'] * 1e3:,.0f} "
            f"ms/step, of which the forward model fwd+bwd "
            f"{svi['model_forward_backward_seconds'] * 1e3:,.0f} ms)")
    return "\n".join(lines)
