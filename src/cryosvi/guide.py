"""The amortized posterior (Pyro guide): one CNN encoder per latent.

Sites match the model 1-to-1; each latent's head (output size, distribution relative to
the prior, conditioning features) is defined once in ``cryosvi.latents``:

    defocus    q(z | x)            Normal(mu, sigma)                       (B,)   Å
    rotation   q(q | x, z)         mixture of antipodal ProjectedNormals    (B, 4) w x y z
    enm_scale  q(alpha | x, z, q)  Normal per mode (independent)            (B, K) Å

Each encoder is the paper's architecture: three modules Conv2d-ReLU-Conv2d-ReLU-MaxPool2d
(3x3 kernels, ``channels`` wide) flattened into a three-layer MLP. With channels
(32, 64, 128) and a 32 px box the flattened features are the paper's "2048" and hidden
widths of 512 give its 1.6 M parameters per encoder.

Outputs are parameterised relative to the prior, so an untrained guide is the prior:
mean = prior_mean + prior_std * h0 and std = prior_std * softplus(h1 + softplus^-1(1)).
The rotation components' concentrations are 1 + exp(h) (a network output), their
directions normalised 4-vectors and their weights softmax logits; each component is antipodally
symmetric (q and -q are the same rotation).

Options (the paper's future work):
* ``conditioning``: the encoders run in the order defocus -> pose -> conformation and the
  MLP of each later encoder also receives the earlier latents (defocus standardised, the
  rotation as its 3x3 matrix, which is the same for q and -q) and any latent fixed to a
  known value. Training by simulation feeds the true earlier values (the forward KL of
  this autoregressive guide factorises exactly); inference feeds samples or means.
* ``phase_flip``: the pose and mode encoders see the image multiplied in Fourier space by
  the sign of the CTF at the conditioning defocus (CTF phase flipping).
* ``shared_trunk``: one conv trunk for all encoders (each keeps its own MLP), which
  divides the convolution cost by the number of latents.
* ``batch_norm``: BatchNorm2d after every convolution (batch statistics in training,
  running ones at inference).
* ``gated_conditioning``: the conditioning reaches each head multiplicatively too: the
  image part of the first MLP layer is multiplied by 1 + g(condition), g an MLP of two
  hidden layers ``gate_hidden`` wide (zero at initialisation). An additive term alone
  cannot represent a read-out that changes with the pose, which the mode amplitude
  needs (measured: the mode head learnt nothing in 0.7 M simulations without the gate,
  r 0.49 with it).

Latents that are fixed to known values (``latents`` leaves them out) are not sites of the
guide; the model is conditioned on them (``pyro.poutine.condition``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import pyro
import torch
from torch import Tensor, nn

from cryosvi.config import PRECISIONS, Optics, Priors
from cryosvi.errors import CryosviError
from cryosvi.latents import ORDER as SAMPLING_ORDER
from cryosvi.latents import PAPER_SITES, REGISTRY, guide_priors, legacy_guide_priors
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.optics import OpticsGroups
from cryosvi.physics.ctf import ctf_rfft, particle_ctf_rfft
from cryosvi.physics.rotations import quarter_turn_images

TURNS = (1, 2, 3, 4)
"""The numbers of quarter turns ``Guide.turns`` can mix."""

def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 arithmetic in hardware: a CUDA device that supports
    it, or a CPU with AVX512-BF16 or AMX (elsewhere oneDNN emulates bf16, slower than
    fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch has no public query for the CPU; a probe a torch release lacks counts as no.
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def trunk_bf16(precision: str, device: torch.device) -> bool:
    """Whether the trunk runs in bf16 for ``precision`` (one of ``PRECISIONS``; 'auto':
    where the device has it natively) on ``device``."""
    if precision not in PRECISIONS:
        raise CryosviError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                           f"{precision!r}")
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def check_turns(turns) -> int:
    """``turns`` if it is one of ``TURNS``, else CryosviError."""
    if turns not in TURNS or isinstance(turns, bool):
        raise CryosviError(f"turns must be 1 to 4, got {turns!r}")
    return int(turns)


ORDER = PAPER_SITES
"""The paper's latents in the sampling order (defocus -> pose -> conformation), the
default ``latents``; every latent's place is ``cryosvi.latents.ORDER``."""

@dataclass
class Architecture:
    """The encoders' layout, as a user chooses it (``cryosvi train`` options): conv
    channels of the three modules, MLP width, pose mixture components, conditioning
    defocus -> pose -> modes, CTF phase flip of the input, one conv trunk for all latents,
    BatchNorm in the trunk, conditioning gates. The defaults are the demo's layout
    (channels 16-32-64, MLP 256, one shared trunk with BatchNorm, gated conditioning; 1.33 M
    parameters for three latents at 32 px; benchmarks/results/ablations.md); results
    recorded before version 0.1.0 had neither BatchNorm nor gates (1.07 M).
    ``PAPER_ARCHITECTURE`` is the paper's encoders (4.8 M)."""

    channels: tuple[int, ...] = (16, 32, 64)
    hidden: int = 256
    n_components: int = 4
    conditioning: bool = True
    phase_flip: bool = False
    shared_trunk: bool = True
    batch_norm: bool = True
    gated_conditioning: bool = True
    gate_hidden: int | None = 64
    """Width of the gates' hidden layers (None: ``hidden``, as run.json files without the
    field mean). 64 keeps the default guide under 5 M parameters at a 64 px working box
    with four latents."""

    def __post_init__(self):
        """ValueError naming the field for a layout no network can have (a run.json
        damaged by hand, a caller's typo), before any layer is built."""
        def width(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not (isinstance(self.channels, (tuple, list)) and self.channels
                and all(width(c) for c in self.channels)):
            raise ValueError(f"channels must be positive integers, got {self.channels!r}")
        for name in ("hidden", "n_components"):
            if not width(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer, got "
                                 f"{getattr(self, name)!r}")
        if self.gate_hidden is not None and not width(self.gate_hidden):
            raise ValueError(f"gate_hidden must be a positive integer or null, got "
                             f"{self.gate_hidden!r}")
        for name in ("conditioning", "phase_flip", "shared_trunk", "batch_norm",
                     "gated_conditioning"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got "
                                 f"{getattr(self, name)!r}")


PAPER_ARCHITECTURE = Architecture(channels=(32, 64, 128), hidden=512, shared_trunk=False,
                                  batch_norm=False, gated_conditioning=False,
                                  gate_hidden=None)
"""The paper's encoders: one conv trunk of 32-64-128 channels and an MLP of 512 per latent
(the first default layout, so also the layout of runs whose run.json predates a
field)."""


@dataclass(kw_only=True)
class GuideConfig(Architecture):
    """Everything needed to rebuild a guide (stored in ``run.json``): the architecture
    plus what the data set fixes.

    latents: inferred sites (the others are fixed to known values). latent_priors: site
    -> the numbers of its prior that the head's outputs are relative to (each latent's
    ``guide_prior``, ``cryosvi.latents``). ctf_estimates: the particles' CTF estimates
    are used (the defocus latent is then an offset around each one), and every head also
    receives the particle's mean defocus estimate, standardised by estimate_mean/std
    (Å). input_scale: images are divided by it before encoding (the std of the particle
    images). optics: dict of :class:`cryosvi.config.Optics`, and groups: the
    ``OpticsGroups`` fields (as lists; per-particle CTFs), needed by ``phase_flip``.
    box: the working box, px.
    """

    box: int
    n_modes: int
    latents: tuple[str, ...] = ORDER
    latent_priors: dict = field(default_factory=lambda: guide_priors(Priors(), False))
    ctf_estimates: bool = False
    estimate_mean: float = 0.0
    estimate_std: float = 1.0
    input_scale: float = 1.0
    optics: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GuideConfig":
        """From ``to_dict``'s output; architecture fields a run.json lacks (written before
        the field existed) take the values of that time, the paper's layout, and the
        per-latent fields of such a run.json become ``latent_priors``."""
        values = {**asdict(PAPER_ARCHITECTURE), **values}
        if "latent_priors" not in values:
            values["latent_priors"] = legacy_guide_priors(values)
        if "defocus_offset" in values:
            values.setdefault("ctf_estimates", values["defocus_offset"])
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in names}
        for key in ("latents", "channels"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def architecture(self) -> Architecture:
        return Architecture(**{f.name: getattr(self, f.name) for f in fields(Architecture)})

    @property
    def sites(self) -> tuple[str, ...]:
        """The model's sites: the inferred ones and the fixed paper latents, in the
        guide's order."""
        return tuple(s for s in SAMPLING_ORDER if s in self.latents or REGISTRY[s].always)


def condition_sites(site: str, config: GuideConfig) -> tuple[str, ...]:
    """The other latents the encoder of ``site`` receives: every earlier one in the
    sampling order, and every later one that is fixed to a known value."""
    if not config.conditioning:
        return ()
    here = SAMPLING_ORDER.index(site)
    return tuple(s for s in config.sites
                 if s != site and (SAMPLING_ORDER.index(s) < here or s not in config.latents))


def condition_width(sites, config: GuideConfig) -> int:
    """Conditioning inputs of a head: the latents' features, and the particle's defocus
    estimate with ``ctf_estimates``."""
    return sum(REGISTRY[s].feature_width(config) for s in sites) + int(config.ctf_estimates)


def conv_trunk(channels, batch_norm: bool) -> nn.Sequential:
    """Three (or len(channels)) modules Conv2d-ReLU-Conv2d-ReLU-MaxPool2d, flattened;
    with ``batch_norm`` each convolution (then without bias) is followed by BatchNorm2d."""
    layers, width = [], 1
    for out in channels:
        for inputs in (width, out):
            layers.append(nn.Conv2d(inputs, out, 3, padding=1, bias=not batch_norm))
            layers += [nn.BatchNorm2d(out), nn.ReLU()] if batch_norm else [nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
        width = out
    return nn.Sequential(*layers, nn.Flatten())


def trunk_features(box: int, channels) -> int:
    side = box
    for _ in channels:
        side //= 2
    if side < 1:
        raise CryosviError(f"box {box} is too small for {len(channels)} pooling stages")
    return channels[-1] * side * side


class Encoder(nn.Module):
    """Conv trunk + three-layer MLP; the first MLP layer is split in an image part and a
    conditioning part so that many conditioning values can share one trunk pass. With
    ``gate`` the image part is also multiplied by 1 + g(condition)."""

    def __init__(self, box: int, channels, hidden: int, n_condition: int, n_out: int,
                 *, own_trunk: bool, batch_norm: bool, gate: bool, gate_hidden: int):
        super().__init__()
        self.trunk = conv_trunk(channels, batch_norm) if own_trunk else None
        self.n_features = trunk_features(box, channels)
        self.first = nn.Linear(self.n_features, hidden)
        self.first_condition = nn.Linear(n_condition, hidden, bias=False) if n_condition else None
        self.gate = None
        if gate and n_condition:
            self.gate = nn.Sequential(nn.Linear(n_condition, gate_hidden), nn.ReLU(),
                                      nn.Linear(gate_hidden, gate_hidden), nn.ReLU(),
                                      nn.Linear(gate_hidden, hidden))
            nn.init.zeros_(self.gate[-1].weight)  # no gating at initialisation
            nn.init.zeros_(self.gate[-1].bias)
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, n_out))
        # Start at the prior: zero final layer (outputs = bias = 0).
        nn.init.zeros_(self.rest[-1].weight)
        nn.init.zeros_(self.rest[-1].bias)

    def features(self, images: Tensor, trunk_output: Tensor | None = None) -> Tensor:
        """(B, 1, L, L) -> (B, hidden), the image part of the first MLP layer (from a
        shared trunk's output when given)."""
        return self.first(self.trunk(images) if trunk_output is None else trunk_output)

    def head(self, features: Tensor, condition: Tensor | None) -> Tensor:
        """features (B, hidden), condition (..., B, c) or None -> outputs (..., B, n_out)."""
        if self.gate is not None:
            features = features * (1 + self.gate(condition))
        if self.first_condition is not None:
            features = features + self.first_condition(condition)
        return self.rest(features)


class Guide(nn.Module):
    """The amortized posterior over the inferred sites of ``config.latents``.

    Every method takes the batch's ``conditions`` (``cryosvi.latents.Conditions``: the
    particles' CTF estimates and known shifts; None: none).

    ``bf16`` (default False): the conv trunk and the image part of each head's first
    layer run under bf16 autocast; the heads, gates and densities stay float32.

    ``turns`` (1, 2 or 4; set for inference, 1 in training): q is the equal mixture of
    the network's posteriors for the image turned by 0 .. turns - 1 quarter turns, each
    mapped back to the particle's frame. A quarter turn of the image is the image of the
    pose turned about the viewing axis (``rotations.quarter_turn_images``), so every
    term is a posterior of the same particle, and mixing them averages out part of the
    network's error, but widens the intervals beyond calibration (measured:
    benchmarks/results/ablations.md).
    """

    def __init__(self, config: GuideConfig):
        super().__init__()
        self.config = config
        if config.shared_trunk and config.phase_flip:
            raise CryosviError("a shared trunk sees one image, so it cannot be combined "
                               "with phase flipping (use separate encoders)")
        self.trunk = (conv_trunk(config.channels, config.batch_norm) if config.shared_trunk
                      else None)
        self.encoders = nn.ModuleDict()
        for site in config.latents:
            n_condition = condition_width(condition_sites(site, config), config)
            self.encoders[site] = Encoder(config.box, config.channels, config.hidden,
                                          n_condition, REGISTRY[site].head_size(config),
                                          own_trunk=not config.shared_trunk,
                                          batch_norm=config.batch_norm,
                                          gate=config.gated_conditioning,
                                          gate_hidden=config.gate_hidden or config.hidden)
            REGISTRY[site].initialise_head(self.encoders[site].rest[-1], config)
        self._turns = 1
        self.bf16 = False  # set by ``train`` and ``load_trained`` (``trunk_bf16``)
        # Convolutions run in channels-last layout (measured ~20% faster on CPU).
        self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ pieces
    @property
    def turns(self) -> int:
        return self._turns

    @turns.setter
    def turns(self, value: int) -> None:
        self._turns = check_turns(value)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def freeze_batch_norm(self) -> None:
        """BatchNorm layers to inference mode (running statistics, not updated) while the
        rest trains: the heads' spreads are then fit to the features inference sees
        (measured: trained with batch statistics to the end, the defocus intervals
        covered 0.98-1.00 instead of 0.95-0.96)."""
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()

    def sampled_conditions(self, site: str) -> tuple[str, ...]:
        """The inferred latents the head of ``site`` is conditioned on."""
        return tuple(s for s in condition_sites(site, self.config) if s in self.config.latents)

    def standardise(self, images: Tensor) -> Tensor:
        """(B, L, L) raw images -> (B, 1, L, L) network input (channels-last layout)."""
        x = (images / self.config.input_scale).unsqueeze(1)
        return x.contiguous(memory_format=torch.channels_last)

    def phase_flipped(self, images: Tensor, defocus: Tensor,
                      conditions: Conditions | None = None) -> Tensor:
        """Images (B, L, L) times sign(CTF) in Fourier space: the CTF at ``defocus`` (B,)
        Å, or with the particles' CTF estimates (``conditions.ctf``) each particle's own
        CTF offset by ``defocus``."""
        box = images.shape[-1]
        defocus = defocus.detach().to(images.dtype)
        if conditions is not None and conditions.ctf is not None:
            ctf = particle_ctf_rfft(conditions.ctf.offset(defocus),
                                    OpticsGroups(**{k: tuple(v) for k, v in
                                                    self.config.groups.items()}), box)
        else:
            ctf = ctf_rfft(defocus, defocus, torch.zeros_like(defocus),
                           Optics(**self.config.optics), box)
        spectrum = torch.fft.rfft2(images) * torch.sign(ctf)
        return torch.fft.irfft2(spectrum, s=(box, box))

    def condition(self, site: str, values: dict[str, Tensor],
                  conditions: Conditions | None = None) -> Tensor | None:
        """Conditioning features of ``site``'s encoder from ``values`` (site -> tensor with
        leading (..., B)), each latent's own standardisation."""
        conditions = conditions or Conditions()
        parts = [REGISTRY[other].features(values[other], self, conditions)
                 for other in condition_sites(site, self.config)]
        if self.config.ctf_estimates:
            estimate = conditions.defocus_estimate()
            parts.append(((estimate - self.config.estimate_mean)
                          / self.config.estimate_std).unsqueeze(-1))
        if not parts:
            return None
        shape = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
        return torch.cat([p.expand(*shape, p.shape[-1]) for p in parts], -1)

    def site_features(self, site: str, images: Tensor, flip_defocus: Tensor | None,
                      cache: dict, conditions: Conditions | None = None) -> Tensor:
        """The first MLP layer's image part for ``site``, (T, B, hidden) for the
        ``turns`` quarter turns of the images; ``cache`` keeps the shared trunk's output
        between the sites of one call."""
        encoder = self.encoders[site]
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.trunk is None:
                inputs = self.turned(self.encoder_input(site, images, flip_defocus,
                                                        conditions))
                features = encoder.features(inputs)
            else:
                if "trunk" not in cache:
                    cache["trunk"] = self.trunk(self.turned(self.standardise(images)))
                features = encoder.features(None, cache["trunk"])
        return features.float().unflatten(0, (self.turns, -1))

    def turned(self, inputs: Tensor) -> Tensor:
        """(B, 1, L, L) -> (T B, 1, L, L): the inputs turned by 0 .. T - 1 quarter turns."""
        if self.turns == 1:
            return inputs
        stack = torch.cat([quarter_turn_images(inputs, k) for k in range(self.turns)])
        return stack.contiguous(memory_format=torch.channels_last)

    def encoder_input(self, site: str, images: Tensor, flip_defocus: Tensor | None,
                      conditions: Conditions | None = None) -> Tensor:
        if self.config.phase_flip and site != FLIP_SITE and flip_defocus is not None:
            images = self.phase_flipped(images, flip_defocus, conditions)
        return self.standardise(images)

    def distribution(self, site: str, features: Tensor, values: dict[str, Tensor],
                     conditions: Conditions | None = None):
        """q(site | x, the conditioning latents in ``values``) with batch shape (..., B);
        features (T, B, hidden) from ``site_features``. With T = ``turns`` > 1 the equal
        mixture over the quarter turns k of q(site | turned x, turned values) mapped back
        to the particle's frame (each latent's ``turned`` and ``turned_back``)."""
        conditions = conditions or Conditions()
        latent = REGISTRY[site]
        parts = []
        for k in range(self.turns):
            turned_values = {s: REGISTRY[s].turned(v, k) for s, v in values.items()}
            turned_conditions = conditions.quarter_turned(k)
            out = self.encoders[site].head(
                features[k], self.condition(site, turned_values, turned_conditions))
            parts.append(latent.turned_back(latent.head(out, self, turned_conditions), k))
        return parts[0] if self.turns == 1 else latent.mixture(parts)

    # ---------------------------------------------------------------- training
    def log_prob(self, images: Tensor, values: dict[str, Tensor],
                 conditions: Conditions | None = None) -> dict[str, Tensor]:
        """log q(value | x, earlier values) per inferred site, (B,) each: the forward-KL
        (simulation-based) loss is minus their sum. ``values`` holds every latent."""
        flip = values.get(FLIP_SITE)
        out, cache = {}, {}
        for site in self.config.latents:
            features = self.site_features(site, images, flip, cache, conditions)
            q = self.distribution(site, features, values, conditions)
            out[site] = q.log_prob(values[site])
        return out

    # --------------------------------------------------------------- sampling
    def sample(self, images: Tensor, known: dict[str, Tensor] | None = None,
               n_samples: int = 1, flip_defocus: Tensor | None = None,
               return_features: bool = False, conditions: Conditions | None = None,
               noise=None):
        """Ancestral samples of the inferred sites given the images.

        Returns (values, log_q, dists): values site -> (S, B, ...) (known sites broadcast),
        log_q (S, B) the guide's log density of the samples, and the distributions of the
        first step of each site (for means). The phase flip uses ``flip_defocus``, else the
        known defocus, else the mean of q(defocus | x). With ``return_features`` a fourth
        item, the image features of each site, lets ``log_prob_at`` score other values.

        ``noise``: the particles' random streams (``cryosvi.randomness.Streams`` over the
        B images): each latent's value is drawn from its particle's own numbers
        (``Latent.draw``), so a particle's samples do not depend on the rest of the
        batch; None draws from torch's global generator (``q.sample()``).
        """
        known = dict(known or {})
        batch = images.shape[0]
        values = {s: v.unsqueeze(0).expand(n_samples, *v.shape) for s, v in known.items()}
        log_q = images.new_zeros(n_samples, batch)
        dists = {}
        if flip_defocus is None and FLIP_SITE in known:
            flip_defocus = known[FLIP_SITE]
        cache, all_features = {}, {}
        for site in self.config.latents:
            features = self.site_features(site, images, flip_defocus, cache, conditions)
            all_features[site] = features
            q = self.distribution(site, features, values, conditions)
            if tuple(q.batch_shape) != (n_samples, batch):
                q = q.expand((n_samples, batch))
            dists[site] = q
            if noise is None:
                value = q.sample()
            else:
                value = REGISTRY[site].draw(q, noise.child(SAMPLING_ORDER.index(site)))
            values[site] = value
            log_q = log_q + q.log_prob(value)
            if site == FLIP_SITE and flip_defocus is None:
                flip_defocus = q.mean[0]
        if return_features:
            return values, log_q, dists, all_features
        return values, log_q, dists

    def log_prob_at(self, features: dict[str, Tensor], values: dict[str, Tensor],
                    conditions: Conditions | None = None) -> Tensor:
        """log q(values | x) (S, B) from the per-site image features of ``sample``;
        ``values`` holds every latent (known ones too) with leading (S, B)."""
        total = 0.0
        for site in self.config.latents:
            q = self.distribution(site, features[site], values, conditions)
            total = total + q.log_prob(values[site])
        return total

    # ------------------------------------------------------------------ Pyro
    def pyro_guide(self, known: dict[str, Tensor] | None = None, register: bool = True):
        """A Pyro guide with the model's signature. ``known``: values of the fixed sites
        for the batch (the model must be conditioned on the same values)."""

        def guide(forward, priors, noise_std, images=None, batch_size=None,
                  n_particles=None, conditions=None, latents=()):
            if register:
                pyro.module("cryosvi_guide", self)
            batch = images.shape[0]
            values = dict(known or {})
            flip = values.get(FLIP_SITE)
            cache = {}
            with pyro.plate("particles", n_particles or batch, subsample_size=batch):
                for site in self.config.latents:
                    features = self.site_features(site, images, flip, cache, conditions)
                    q = self.distribution(site, features, values, conditions)
                    values[site] = pyro.sample(site, q)
                    if site == FLIP_SITE and flip is None:
                        flip = values[site]
            return values

        return guide


FLIP_SITE = next(s for s in SAMPLING_ORDER if REGISTRY[s].sets_ctf)
"""The latent whose value sets the CTF that ``phase_flip`` flips by (the defocus)."""


def build_guide(config: GuideConfig) -> Guide:
    return Guide(config)
