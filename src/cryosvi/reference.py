"""A reference: pseudo-atoms, their normal modes and every setting of the forward model.

It travels from ``simulate`` to ``train`` to ``infer`` as ``reference.npz``, so a data
set or a run records everything needed to rebuild its forward model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cryosvi import config
from cryosvi.config import Imaging, Noise, Optics, Priors
from cryosvi.errors import CryosviError
from cryosvi.io.atomic import save_npz_atomically


@dataclass(frozen=True)
class Reference:
    """coords (N, 3) Å centred; centroid (3,) Å of the original structure; modes (K, N, 3)
    orthonormal; eigenvalues (K,) of the ANM Hessian (gamma units / Å^2)."""

    coords: np.ndarray
    centroid: np.ndarray
    modes: np.ndarray
    eigenvalues: np.ndarray
    optics: Optics
    imaging: Imaging
    priors: Priors
    noise: Noise
    source: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return self.coords.shape[0]

    @property
    def n_modes(self) -> int:
        return self.modes.shape[0]

    def with_settings(self, **changes) -> "Reference":
        return replace(self, **changes)

    def forward_model(self):
        from cryosvi.forward import ForwardModel

        return ForwardModel(self.coords, self.modes, self.optics, self.imaging)

    def save(self, path: str | Path) -> None:
        """Write ``path`` (.npz) atomically."""
        path = Path(path)
        settings = {
            "optics": config.asdict(self.optics), "imaging": config.asdict(self.imaging),
            "priors": config.asdict(self.priors), "noise": config.asdict(self.noise),
            "source": self.source,
        }
        save_npz_atomically(path, coords=self.coords, centroid=self.centroid,
                            modes=self.modes, eigenvalues=self.eigenvalues,
                            settings=json.dumps(settings))

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        path = Path(path)
        if not path.is_file():
            raise CryosviError(f"reference file not found: {path}")
        try:
            with np.load(path) as data:
                settings = json.loads(str(data["settings"]))
                arrays = {k: data[k] for k in ("coords", "centroid", "modes", "eigenvalues")}
        except (KeyError, ValueError, OSError) as error:
            raise CryosviError(f"{path} is not a cryosvi reference (.npz): {error}") from None
        return cls(**arrays,
                   optics=config.from_dict(Optics, settings["optics"]),
                   imaging=config.from_dict(Imaging, settings["imaging"]),
                   priors=config.from_dict(Priors, settings["priors"]),
                   noise=config.from_dict(Noise, settings["noise"]),
                   source=settings.get("source", {}))


def build_reference(structure: str | Path | None, chain: str | None, stride: int,
                    optics: Optics, imaging: Imaging, priors: Priors, noise: Noise,
                    cutoff: float = 15.0, gamma: float = 1.0) -> Reference:
    """Pseudo-atoms of ``structure`` (default: the bundled 1OL5) and their lowest
    ``priors.n_modes`` ANM modes."""
    from cryosvi.anm import anm_modes
    from cryosvi.structure import default_structure_path, load_pseudo_atoms

    path = Path(structure) if structure else default_structure_path()
    atoms = load_pseudo_atoms(path, chain=chain, stride=stride)
    modes = anm_modes(atoms.coords, n_modes=priors.n_modes, cutoff=cutoff, gamma=gamma)
    return Reference(
        coords=atoms.coords, centroid=atoms.centroid, modes=modes.vectors,
        eigenvalues=modes.eigenvalues, optics=optics, imaging=imaging, priors=priors,
        noise=noise,
        source={"structure": str(path), "chain": atoms.chain, "stride": stride,
                "cutoff": cutoff, "gamma": gamma},
    )
