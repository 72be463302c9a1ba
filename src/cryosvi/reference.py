"""A reference: pseudo-atoms, their normal modes and every setting of the forward model.

It travels from ``simulate`` to ``train`` to ``infer`` as ``reference.npz``, so a data
set or a run records everything needed to rebuild its forward model, and, when one is
known, the noise model of the images (``cryosvi.physics.noise.NoiseModel``: its spectra
as the arrays ``noise_model_<name>``, its numbers under ``noise_model`` in the settings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cryosvi import config
from cryosvi.config import Imaging, Noise, Optics, Priors
from cryosvi.errors import CryosviError
from cryosvi.io.atomic import save_npz_atomically
from cryosvi.io.outputs import file_kind, provenance_array
from cryosvi.physics.noise import NoiseModel


@dataclass(frozen=True)
class RigidBlocks:
    """Modes that move blocks of pseudo-atoms rigidly (those learnt in a basis of rigid
    blocks or chain segments, ``cryosvi learn-modes --basis blocks|segments``), as each
    block's motion, so that the atoms of a structure can follow them
    (``cryosvi.analysis.ensemble``).

    labels (N,) int: each pseudo-atom's block, 0..B-1. Block b's centre c_b is the
    centroid of its pseudo-atoms in ``Reference.structure_beads``.
    rotations (K, B, 3): mode k's infinitesimal rotation of block b about c_b, a rotation
    vector (rad per Å RMS of the mode's amplitude); translations (K, B, 3): of c_b (Å per
    Å RMS). To first order mode k moves pseudo-atom i of block b by
    a_k (translations[k, b] + rotations[k, b] x (r_i - c_b)) = sqrt(N) a_k modes[k, i].
    offset_rotation, offset_translation (B, 3): the same for the displacement (amplitude
    1) from the structure's pseudo-atoms to ``Reference.coords`` (for learnt modes, the
    particles' mean conformation).
    """

    labels: np.ndarray
    rotations: np.ndarray
    translations: np.ndarray
    offset_rotation: np.ndarray
    offset_translation: np.ndarray

    @property
    def n_blocks(self) -> int:
        return self.offset_rotation.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by their names in reference.npz."""
        return {f"block_{name}": getattr(self, name) for name in BLOCK_ARRAYS}


BLOCK_ARRAYS = ("labels", "rotations", "translations", "offset_rotation",
                "offset_translation")
"""The ``RigidBlocks`` arrays of a reference.npz (``block_`` + name); older files have
none."""


@dataclass(frozen=True)
class Reference:
    """coords (N, 3) Å centred; centroid (3,) Å of the original structure; modes (K, N, 3)
    orthonormal; eigenvalues (K,) of the ANM Hessian (gamma units / Å^2), or for modes
    learnt from particles (``cryosvi.inference.learnt_modes``, ``source['modes'] == 'learnt'``) the
    particles' variance along each (Å^2).

    structure_coords (N, 3) Å, in the frame of coords: the pseudo-atoms of the structure
    the reference was made from, where coords differ from them (learnt modes: coords are
    the particles' mean conformation); None: coords are the structure's. blocks: the
    modes as rigid motions of blocks of pseudo-atoms (``RigidBlocks``), for modes learnt
    in a basis of rigid blocks; None otherwise. References written by earlier versions
    have neither and load with None. noise_model: the images' noise, or None (white
    noise of ``noise.std``)."""

    coords: np.ndarray
    centroid: np.ndarray
    modes: np.ndarray
    eigenvalues: np.ndarray
    optics: Optics
    imaging: Imaging
    priors: Priors
    noise: Noise
    source: dict = field(default_factory=dict)
    noise_model: NoiseModel | None = None
    structure_coords: np.ndarray | None = None
    blocks: RigidBlocks | None = None

    @property
    def n_atoms(self) -> int:
        return self.coords.shape[0]

    @property
    def n_modes(self) -> int:
        return self.modes.shape[0]

    @property
    def structure_beads(self) -> np.ndarray:
        """(N, 3) Å: the structure's own pseudo-atoms (``structure_coords``, else
        ``coords``), in the frame of coords (the file frame minus ``centroid``)."""
        return self.coords if self.structure_coords is None else self.structure_coords

    def with_settings(self, **changes) -> "Reference":
        return replace(self, **changes)

    def forward_model(self, groups=None, envelope: bool = True, modes=None):
        """The ForwardModel of these settings; ``groups``: the ``OpticsGroups`` of
        per-particle CTFs (default: ``optics`` as the only group). ``envelope``: the
        model images get the B envelope of ``noise_model`` (its ``bfactor``, relative to
        the model) on top of each CTF's, as the likelihood and the training simulations
        need; False: the bare model (a simulator that adds its own effects). ``modes``
        (D, N, 3): displacement directions other than the reference's own (e.g. a
        fitting basis)."""
        from cryosvi.physics.forward import ForwardModel

        bfactor = self.noise_model.bfactor if envelope and self.noise_model else 0.0
        return ForwardModel(self.coords, self.modes if modes is None else modes,
                            self.optics, self.imaging, groups, envelope_bfactor=bfactor)

    def at_box(self, box: int, pixel_size: float) -> "Reference":
        """The reference for images of ``box`` px of ``pixel_size`` Å (a working box the
        particles are Fourier-cropped to); unchanged when both are already its own. A new
        pixel size takes the default window of the Gaussians (+-3 sigma)."""
        if box == self.optics.box and pixel_size == self.optics.pixel_size:
            return self
        imaging = self.imaging
        if pixel_size != self.optics.pixel_size:
            imaging = replace(imaging, window=None)
        noise_model = self.noise_model and self.noise_model.at_box(box)  # cropped
        return replace(self, optics=replace(self.optics, box=int(box),
                                            pixel_size=float(pixel_size)),
                       imaging=imaging, noise_model=noise_model)

    def save(self, path: str | Path) -> None:
        """Write ``path`` (.npz) atomically."""
        path = Path(path)
        settings = {
            "optics": config.asdict(self.optics), "imaging": config.asdict(self.imaging),
            "priors": config.asdict(self.priors), "noise": config.asdict(self.noise),
            "source": self.source,
        }
        noise_arrays = {}
        if self.noise_model is not None:
            settings["noise_model"], noise_arrays = _noise_model_entries(self.noise_model)
        optional = {} if self.structure_coords is None else {
            "structure_coords": self.structure_coords}
        if self.blocks is not None:
            optional.update(self.blocks.arrays())
        save_npz_atomically(path, coords=self.coords, centroid=self.centroid,
                            modes=self.modes, eigenvalues=self.eigenvalues,
                            settings=json.dumps(settings), **optional, **noise_arrays,
                            cryosvi=provenance_array("reference"))

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        """Read a reference written by :meth:`save` (no pickle); CryosviError (one line)
        for a missing, damaged or inconsistent file."""
        path = Path(path)
        if not path.is_file():
            raise CryosviError(f"reference file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                settings = json.loads(str(data["settings"]))
                arrays = {k: data[k] for k in ARRAYS}
                noise_arrays = {k: data[f"noise_model_{k}"] for k in NOISE_MODEL_ARRAYS
                                if "noise_model" in settings}
                if "structure_coords" in data.files:
                    arrays["structure_coords"] = data["structure_coords"]
                if all(f"block_{name}" in data.files for name in BLOCK_ARRAYS):
                    arrays["blocks"] = RigidBlocks(**{name: data[f"block_{name}"]
                                                      for name in BLOCK_ARRAYS})
        except Exception as error:  # zip, key, JSON, dtype and pickle refusals alike
            text = str(error).strip().splitlines()[0] if str(error).strip() else \
                type(error).__name__
            kind = file_kind(path)
            if kind not in (None, "reference"):
                text = f"it is a cryosvi {kind} file"
            raise CryosviError(f"{path} is not a cryosvi reference (.npz): {text}") from None
        try:
            reference = cls(**arrays,
                            optics=config.from_dict(Optics, settings["optics"]),
                            imaging=config.from_dict(Imaging, settings["imaging"]),
                            priors=config.from_dict(Priors, settings["priors"]),
                            noise=config.from_dict(Noise, settings["noise"]),
                            source=dict(settings.get("source") or {}),
                            noise_model=_noise_model(settings.get("noise_model"),
                                                     noise_arrays, f"{path}: "))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CryosviError(f"{path} is damaged: bad settings ({error!r})") from None
        reference.check(f"{path}: ")
        return reference

    def check(self, where: str = "") -> None:
        """Shapes and finiteness of the arrays and ranges of the settings
        (``config.check``); CryosviError naming the problem."""
        n = self.coords.shape[0] if np.ndim(self.coords) == 2 else 0
        shapes = {"coords": (n, 3), "centroid": (3,), "modes": (self.priors.n_modes, n, 3),
                  "eigenvalues": (self.priors.n_modes,)}
        if n < 1:
            raise CryosviError(f"{where}coords must be (N, 3) with N >= 1, got "
                               f"{self.coords.shape}")
        for name, shape in shapes.items():
            value = getattr(self, name)
            if value.dtype.kind not in "fiu":
                raise CryosviError(f"{where}{name} is not numeric ({value.dtype})")
            if value.shape != shape:
                raise CryosviError(f"{where}{name} has shape {value.shape}, expected {shape} "
                                   f"(N = {n} atoms, {self.priors.n_modes} mode std(s))")
            if not np.isfinite(value).all():
                raise CryosviError(f"{where}{name} holds non-finite values")
        if np.abs(self.coords).max() > 1e5:
            raise CryosviError(f"{where}coords beyond 10^5 Å")
        optional = {} if self.structure_coords is None else {
            "structure_coords": (self.structure_coords, (n, 3))}
        if self.blocks is not None:
            k, b = self.priors.n_modes, self.blocks.n_blocks
            optional.update({f"block_{name}": (getattr(self.blocks, name), shape)
                             for name, shape in zip(BLOCK_ARRAYS, [
                                 (n,), (k, b, 3), (k, b, 3), (b, 3), (b, 3)])})
        for name, (value, shape) in optional.items():
            if value.dtype.kind not in "fiu" or value.shape != shape or \
                    not np.isfinite(value).all():
                raise CryosviError(f"{where}{name} is not a finite numeric array of shape "
                                   f"{shape} ({value.dtype}, {value.shape})")
        if self.blocks is not None:
            labels = self.blocks.labels
            if labels.dtype.kind not in "iu" or labels.min() < 0 or \
                    set(np.unique(labels)) != set(range(self.blocks.n_blocks)):
                raise CryosviError(f"{where}block_labels must number every block "
                                   f"0..{self.blocks.n_blocks - 1}")
        config.check(self.optics, self.imaging, self.priors, self.noise, where)


ARRAYS = ("coords", "centroid", "modes", "eigenvalues")
NOISE_MODEL_ARRAYS = ("noise", "error", "signal_power")
"""The NoiseModel's spectra, saved as ``noise_model_<name>`` (G, shells) float64."""
NOISE_MODEL_NUMBERS = ("box", "pixel_size", "error_weight", "contrast_mean", "contrast_std",
                       "contrast_floor", "bfactor", "level_std", "cropped", "origin",
                       "groups")
NOISE_MODEL_DEFAULTS = {"level_std": 0.0, "groups": ()}
"""Numbers that files written before they existed lack, and their values there."""


def _noise_model_entries(noise: NoiseModel) -> tuple[dict, dict]:
    """(settings entry, arrays) of a NoiseModel for ``Reference.save``."""
    numbers = {name: getattr(noise, name) for name in NOISE_MODEL_NUMBERS}
    arrays = {f"noise_model_{name}": getattr(noise, name).cpu().numpy()
              for name in NOISE_MODEL_ARRAYS}
    return numbers, arrays


def _noise_model(numbers: dict | None, arrays: dict, where: str) -> NoiseModel | None:
    """The NoiseModel of a saved reference (``_noise_model_entries``), checked."""
    if numbers is None:
        return None
    for name, value in arrays.items():
        if value.dtype.kind != "f":
            raise CryosviError(f"{where}noise_model_{name} is not floating-point")
    try:
        return NoiseModel(**{k: numbers[k] if k in numbers else NOISE_MODEL_DEFAULTS[k]
                             for k in NOISE_MODEL_NUMBERS},
                          **{k: torch.from_numpy(np.array(v, dtype=np.float64))
                             for k, v in arrays.items()})
    except CryosviError as error:
        raise CryosviError(f"{where}{error}") from None


def build_reference(structure: str | Path | None, chain: str | None, stride: int,
                    optics: Optics, imaging: Imaging, priors: Priors, noise: Noise,
                    cutoff: float = 15.0, gamma: float = 1.0, beads: str = "ca") -> Reference:
    """Pseudo-atoms of ``structure`` (default: the bundled 1OL5; ``beads`` and ``stride``
    as ``cryosvi.physics.structure.load_pseudo_atoms``) and their lowest ``priors.n_modes`` ANM
    modes."""
    from cryosvi.physics.anm import anm_modes
    from cryosvi.physics.structure import default_structure_path, load_pseudo_atoms

    path = Path(structure) if structure else default_structure_path()
    atoms = load_pseudo_atoms(path, chain=chain, stride=stride, beads=beads)
    modes = anm_modes(atoms.coords, n_modes=priors.n_modes, cutoff=cutoff, gamma=gamma)
    reference = Reference(
        coords=atoms.coords, centroid=atoms.centroid, modes=modes.vectors,
        eigenvalues=modes.eigenvalues, optics=optics, imaging=imaging, priors=priors,
        noise=noise,
        source={"structure": str(path.resolve()), "chain": atoms.chain, "stride": stride,
                "beads": beads, "cutoff": cutoff, "gamma": gamma},
    )
    reference.check()
    return reference
