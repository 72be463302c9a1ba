"""The B envelope the particles show beyond a learnt reference's model images, which
nobody states: ``learn-modes`` keeps it in the learnt reference's noise model, so that
``cryosvi train`` simulates with it and ``cryosvi infer`` starts from it."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryosvi.physics.spectrum import bfactor_from_gain_sums, n_shells, shell_gain_sums
from cryosvi.reference import Reference

ENVELOPE_NODES = 3
"""Gauss-Hermite nodes per learnt mode of ``fitted_envelope``'s average over the
conformations (exact for model images polynomial in the amplitudes up to degree 5)."""


def fitted_envelope(learnt: Reference, groups, images, rotation: Tensor, ctf,
                    shifts: Tensor | None, weights: Tensor,
                    chunk_size: int = 256) -> tuple[float, int]:
    """(B Å^2, shells used): the envelope exp(-B s^2 / 4) the particles show beyond the
    ``learnt`` reference's model images (its noise model's envelope included) at their
    given poses, CTFs and shifts (as in ``fit_amplitudes``), weights (n,); at most
    ``chunk_size`` model images at a time.

    Against each particle's model image averaged over the learnt prior of the
    conformations, m_i = E_a m_i(a) (Gauss-Hermite, ENVELOPE_NODES per mode), the
    per-shell gain sum x_i . m_i / sum |m_i|^2 in the noise model's metric
    (``spectrum.shell_gain_sums``) has expectation g(s), the envelope times the contrast,
    when the conformations follow that prior: no fitted quantity of a particle enters
    m_i. Then its Guinier line (``spectrum.bfactor_from_gain_sums``; B nan when fewer
    than 3 shells are measurable). At each particle's fitted amplitudes instead, they fit
    the noise too: B came out 82 for 100 at SNR 2, -27 on the realistic set at SNR 0.1."""
    read = images if callable(images) else images.__getitem__
    noise_model = learnt.noise_model
    forward = learnt.forward_model(groups).to(rotation.device)
    device = rotation.device
    nodes, node_weights = np.polynomial.hermite_e.hermegauss(ENVELOPE_NODES)
    std = torch.tensor(learnt.priors.mode_std, dtype=torch.float64)
    grid = torch.cartesian_prod(*[torch.from_numpy(nodes)] * learnt.n_modes).reshape(
        -1, learnt.n_modes) * std
    share = torch.cartesian_prod(*[torch.from_numpy(node_weights / node_weights.sum())]
                                 * learnt.n_modes).reshape(-1, learnt.n_modes).prod(1)
    count = len(grid)
    step = max(1, chunk_size // count)  # at most chunk_size model images at a time
    sums = torch.zeros(2, n_shells(noise_model.box), dtype=torch.float64)
    for start in range(0, rotation.shape[0], step):
        rows = torch.arange(start, min(rotation.shape[0], start + step))
        every = rows.repeat_interleave(count)
        with torch.no_grad():
            model = forward(grid.repeat(len(rows), 1).float().to(device),
                            rotation[every.to(device)], None, ctf=ctf.take(every),
                            shifts=None if shifts is None else shifts[every.to(device)])
        mean = (model.cpu().double().reshape(len(rows), count, *model.shape[1:])
                * share[:, None, None]).sum(1)
        data = read(rows).double()
        group = (torch.zeros(len(rows), dtype=torch.long) if ctf.group is None
                 else ctf.group[rows.to(ctf.group.device)].cpu())
        sums += torch.stack(shell_gain_sums(data, mean, noise_model.spectra(group, data),
                                            weights[rows], noise_model.cropped))
    return bfactor_from_gain_sums(*sums, noise_model.box, noise_model.pixel_size)
