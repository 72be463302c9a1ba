"""Quarter turns of the image (``rotations.quarter_turn_*``) and the guide's average over
them (``Guide.turns``): checked against the forward model and against the guide's own
posteriors of the turned images."""

import math

import pytest
import torch

from cryosvi.guide import Guide
from cryosvi.latents import ORDER
from cryosvi.physics.conditions import Conditions
from cryosvi.physics.rotations import (quarter_turn_images, quarter_turn_quaternion,
                               quarter_turn_shifts, quaternion_product, random_quaternions)

from test_guide import tiny_config, tiny_reference


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_a_turned_image_is_the_image_of_the_turned_pose_and_shifts(turns):
    """Every pixel but the first row and column (whose partners lie outside the box)."""
    reference = tiny_reference(box=16)
    forward = reference.forward_model()
    torch.manual_seed(turns)
    n = 4
    rotation, modes = random_quaternions(n), 2 * torch.randn(n, 1)
    defocus = torch.full((n,), 9000.0)
    shifts = torch.tensor([[5.0, -10.0]]).expand(n, 2)  # whole 5 Å pixels
    image = forward(enm_scale=modes, rotation=rotation, defocus=defocus, shifts=shifts)
    turned_pose = quaternion_product(quarter_turn_quaternion(turns, rotation), rotation)
    expected = forward(enm_scale=modes, rotation=turned_pose, defocus=defocus,
                       shifts=quarter_turn_shifts(shifts, turns))
    turned = quarter_turn_images(image, turns)
    torch.testing.assert_close(turned[..., 1:, 1:], expected[..., 1:, 1:],
                               atol=1e-5 * float(image.abs().max()), rtol=0)
    assert not torch.allclose(turned, image, atol=1e-3)


def random_guide(**changes) -> Guide:
    torch.manual_seed(0)
    guide = Guide(tiny_config(**changes))
    for parameter in guide.parameters():  # a trained guide: non-zero heads
        torch.nn.init.normal_(parameter, std=0.1)
    return guide.eval()


def test_the_turned_guide_is_the_mixture_of_the_guides_of_the_turned_images():
    """log q_T(z | x) = logsumexp_k log q(turn_k z | turn_k x) - log T, every latent
    (shifts too, with the file's shifts turned), against the plain guide run on the
    turned images and values."""
    guide = random_guide(latents=ORDER)
    batch = 3
    images = torch.randn(batch, 16, 16)
    conditions = Conditions(shifts=torch.randn(batch, 2))
    values = {"defocus": torch.full((batch,), 9000.0) + 500 * torch.randn(batch),
              "rotation": random_quaternions(batch), "enm_scale": torch.randn(batch, 1),
              "shifts": conditions.shifts + torch.randn(batch, 2)}
    guide.turns = 4
    mixed = guide.log_prob(images, values, conditions)
    guide.turns = 1
    per_turn = []
    for k in range(4):
        turned = {"defocus": values["defocus"], "enm_scale": values["enm_scale"],
                  "rotation": quaternion_product(quarter_turn_quaternion(k, images),
                                                 values["rotation"]),
                  "shifts": quarter_turn_shifts(values["shifts"], k)}
        per_turn.append(guide.log_prob(quarter_turn_images(images, k), turned,
                                       conditions.quarter_turned(k)))
    for site, log_q in mixed.items():
        expected = torch.logsumexp(torch.stack([p[site] for p in per_turn]), 0) - math.log(4)
        torch.testing.assert_close(log_q, expected, rtol=1e-4, atol=1e-4)


def test_the_turned_guide_scores_its_own_samples_and_averages_the_pose():
    guide = random_guide()
    guide.turns = 4
    images = torch.randn(5, 16, 16)
    values, log_q, dists, features = guide.sample(images, n_samples=3,
                                                  return_features=True)
    torch.testing.assert_close(guide.log_prob_at(features, values), log_q,
                               rtol=1e-4, atol=1e-4)
    assert dists["rotation"].logits.shape[-1] == 4 * guide.config.n_components
    from cryosvi.posterior import posterior_summary

    summary = posterior_summary(guide, images, n_samples=8)
    assert torch.allclose(summary["rotation_mean"].norm(dim=-1), torch.ones(5))


def test_infer_refuses_a_number_of_turns_it_cannot_make(tmp_path):
    from cryosvi.errors import CryosviError
    from cryosvi.inference.driver import infer

    with pytest.raises(CryosviError, match="turns must be 1 to 4"):
        infer(tmp_path / "run", tmp_path / "p.star", tmp_path / "out.star", turns=0)


@pytest.mark.parametrize("turns", [0, 5, 2.5, True])
def test_the_guide_refuses_a_number_of_turns_it_cannot_mix(turns):
    from cryosvi.errors import CryosviError

    guide = random_guide()
    with pytest.raises(CryosviError, match="turns must be 1 to 4"):
        guide.turns = turns
    assert guide.turns == 1
