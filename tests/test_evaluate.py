"""``cryosvi evaluate``: metrics on hand-made cases and the command end to end."""

import json
import re
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from scipy.spatial.transform import Rotation

from cryosvi.cli.main import main
from cryosvi.config import Optics
from cryosvi.errors import CryosviError
from cryosvi.evaluate import (PLOT_FILES, evaluate_tables, format_table, gaussian_coverage,
                              pearson_r, rmse)
from cryosvi.physics.rotations import euler_geodesic_error, quaternion_geodesic_error
from cryosvi.latents.pose import frame_alignment, pose_coverage
from cryosvi.io.particles import ParticleSet, read_particles
from cryosvi.io.star import optics_table, write_star
from cryosvi.physics.rotations import euler_to_matrix, matrix_to_euler


def numpy_geodesic_deg(first, second):
    """Independent reference: arccos((tr(A^T B) - 1) / 2) in numpy, degrees."""
    trace = np.einsum("nij,nij->n", first, second)
    return np.rad2deg(np.arccos(np.clip((trace - 1) / 2, -1, 1)))


def hamilton(p, q):
    """Quaternion product (w, x, y, z), written out."""
    w1, x1, y1, z1 = np.moveaxis(p, -1, 0)
    w2, x2, y2, z2 = np.moveaxis(q, -1, 0)
    return np.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
                     w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
                     w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2], -1)


def random_angles(n, rng):
    return np.stack([rng.uniform(-180, 180, n), rng.uniform(5, 175, n),
                     rng.uniform(-180, 180, n)], -1)


# ------------------------------------------------------------------ pose geodesic error


@pytest.mark.parametrize("theta", [1e-4, 0.5, 5.0, 90.0, 179.0])
@pytest.mark.parametrize("axis", [0, 2])
def test_extra_rotation_about_z_gives_that_angle(theta, axis):
    # A = Rz(psi) Ry(tilt) Rz(rot): adding theta to psi (or to rot) composes one more
    # rotation of theta about z, on the left (or right), so the geodesic error is theta.
    angles = random_angles(50, np.random.default_rng(1))
    moved = angles.copy()
    moved[:, axis] += theta
    np.testing.assert_allclose(euler_geodesic_error(angles, moved), theta,
                               rtol=1e-7, atol=1e-7)


def test_equivalent_euler_triples_give_zero_error():
    rng = np.random.default_rng(2)
    angles = random_angles(40, rng)
    a = rng.uniform(-180, 180, 40)
    tilt0 = angles.copy()
    tilt0[:, 1] = 0
    tilt180 = angles.copy()
    tilt180[:, 1] = 180
    cases = [
        # gimbal lock at tilt 0: only rot + psi matters
        (tilt0, tilt0 + np.stack([a, 0 * a, -a], -1)),
        # at tilt 180: only psi - rot matters
        (tilt180, tilt180 + np.stack([a, 0 * a, a], -1)),
        # RELION's twin triple (rot + 180, -tilt, psi + 180)
        (angles, angles * [1, -1, 1] + [180, 0, 180]),
        # full turns
        (angles, angles + [360, -360, 720]),
    ]
    for first, second in cases:
        np.testing.assert_allclose(euler_geodesic_error(first, second), 0, atol=1e-5)


def test_euler_error_matches_numpy_trace_formula_and_known_flip():
    rng = np.random.default_rng(3)
    first, second = random_angles(200, rng), random_angles(200, rng)
    matrices = [euler_to_matrix(*torch.as_tensor(a.T, dtype=torch.float64)).numpy()
                for a in (first, second)]
    np.testing.assert_allclose(euler_geodesic_error(first, second),
                               numpy_geodesic_deg(*matrices), atol=1e-6)
    # tilt 0 vs tilt 180 is a half-turn about y
    assert euler_geodesic_error([[0, 0, 0]], [[0, 180, 0]])[0] == pytest.approx(180, abs=1e-6)


def test_quaternion_error_q_and_minus_q_and_known_angle():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(100, 4))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    np.testing.assert_allclose(quaternion_geodesic_error(q, -q), 0, atol=1e-6)
    np.testing.assert_allclose(quaternion_geodesic_error(q, q), 0, atol=1e-6)
    for theta in (1e-4, 3.0, 120.0, 180.0):
        half = np.deg2rad(theta) / 2
        axis = rng.normal(size=(100, 3))
        axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
        turn = np.concatenate([np.full((100, 1), np.cos(half)), np.sin(half) * axis], -1)
        turned = hamilton(q, turn)
        np.testing.assert_allclose(quaternion_geodesic_error(q, turned), theta, rtol=1e-6)
        np.testing.assert_allclose(quaternion_geodesic_error(q, -turned), theta, rtol=1e-6)


# ----------------------------------------------------------------- r, RMSE and coverage


def test_pearson_and_rmse_against_scipy_and_hand_values():
    rng = np.random.default_rng(5)
    x = rng.normal(size=300)
    y = 0.7 * x + rng.normal(size=300)
    assert pearson_r(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert pearson_r(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson_r(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson_r(x, np.full(300, 3.0)))  # constant: undefined, not 0
    assert rmse([0, 0], [3, 4]) == pytest.approx(math.sqrt(12.5))
    assert rmse(x, y) == pytest.approx(np.sqrt(np.mean((x - y) ** 2)))


def binomial_tolerance(p, n, k=4.0):
    return k * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("level", [0.68, 0.95])
def test_gaussian_coverage_is_calibrated_only_with_correct_stds(level):
    n = 20000
    rng = np.random.default_rng(6)
    std = rng.uniform(50, 500, n)  # heteroscedastic, as a real posterior
    mean = rng.normal(10000, 2000, n)
    truth = mean + std * rng.normal(size=n)
    observed = gaussian_coverage(truth, mean, std, level)
    assert abs(observed - level) < binomial_tolerance(level, n)
    # stds half the truth: P(|Z| < z/2) = 0.38 (68 %) and 0.67 (95 %)
    expected = 2 * scipy.stats.norm.cdf(scipy.stats.norm.ppf(0.5 + level / 2) / 2) - 1
    too_small = gaussian_coverage(truth, mean, std / 2, level)
    assert abs(too_small - expected) < binomial_tolerance(expected, n)
    assert too_small < level - 0.25


@pytest.mark.parametrize("level", [0.68, 0.95])
def test_pose_coverage_from_real_rotations(level):
    # True rotations perturbed by exp(w), w ~ N(0, sigma^2 I_3) per particle (scipy's
    # rotation vectors, not ours): the geodesic error is |w|, sigma * chi_3.
    n = 20000
    rng = np.random.default_rng(7)
    truth = random_angles(n, rng)
    sigma_deg = rng.uniform(1, 10, n)
    w = np.deg2rad(sigma_deg)[:, None] * rng.normal(size=(n, 3))
    matrices = euler_to_matrix(*torch.as_tensor(truth.T, dtype=torch.float64)).numpy()
    perturbed = torch.as_tensor(matrices @ Rotation.from_rotvec(w).as_matrix())
    predicted = np.stack([a.numpy() for a in matrix_to_euler(perturbed)], -1)
    error = euler_geodesic_error(truth, predicted)
    np.testing.assert_allclose(error, np.rad2deg(np.linalg.norm(w, axis=-1)), atol=1e-6)
    assert abs(pose_coverage(error, sigma_deg, level) - level) < binomial_tolerance(level, n)
    assert pose_coverage(error, sigma_deg / 2, level) < level - 0.3


# ------------------------------------------------------------------- tables and the CLI


def make_tables(n=60, k=2, seed=0, calibrated=True, names=True):
    """A truth table and a posterior whose errors are drawn from its own stds."""
    rng = np.random.default_rng(seed)
    truth = pd.DataFrame(random_angles(n, rng), columns=["rlnAngleRot", "rlnAngleTilt",
                                                         "rlnAnglePsi"])
    defocus = rng.normal(10000, 1500, n)
    truth["rlnDefocusU"] = truth["rlnDefocusV"] = defocus
    for j in range(1, k + 1):
        truth[f"cryosviModeAmplitude{j}"] = rng.normal(0, 2, n)
    if names:
        truth.insert(0, "rlnImageName", [f"{i + 1:06d}@stack.mrcs" for i in range(n)])
    posterior = truth.copy()
    scale = 1.0 if calibrated else 0.2
    posterior["cryosviDefocusStd"] = np.full(n, 200.0) * scale
    posterior["rlnDefocusU"] = posterior["rlnDefocusV"] = defocus + 200 * rng.normal(size=n)
    for j in range(1, k + 1):
        posterior[f"cryosviModeAmplitude{j}"] += 0.5 * rng.normal(size=n)
        posterior[f"cryosviModeAmplitudeStd{j}"] = 0.5 * scale
    posterior["rlnAnglePsi"] += 3.0  # every pose 3 degrees off about z
    posterior["cryosviPoseStdDeg"] = 2.0
    return posterior, truth


def as_table(frame, name="x.star"):
    frame = frame.reset_index(drop=True)
    return ParticleSet(frame, optics_table(Optics()), Path(name), "relion3.1",
                       list(frame.columns))


def test_evaluate_tables_numbers_and_row_matching():
    posterior, truth = make_tables(n=200, k=2)
    metrics = evaluate_tables(as_table(posterior), as_table(truth))
    assert metrics["matched_by"] == "rlnImageName" and metrics["n_particles"] == 200
    assert set(metrics["latents"]) == {"defocus", "mode1", "mode2"}
    defocus = metrics["latents"]["defocus"]
    assert defocus["pearson_r"] == pytest.approx(
        scipy.stats.pearsonr(truth["rlnDefocusU"], posterior["rlnDefocusU"])[0])
    assert defocus["rmse"] == pytest.approx(
        np.sqrt(np.mean((truth["rlnDefocusU"] - posterior["rlnDefocusU"]) ** 2)))
    pose = metrics["pose"]
    for key in ("median_error_deg", "mean_error_deg", "p90_error_deg"):
        assert pose[key] == pytest.approx(3.0, abs=1e-6)
    # 3 deg error vs radius 1.872 * 2 = 3.74 (68 %) and 2.795 * 2 = 5.59 (95 %): all inside
    assert pose["coverage68"] == 1.0 and pose["coverage95"] == 1.0
    assert metrics["skipped"] == []
    assert set(metrics["calibration"]) == {"levels", "defocus", "mode1", "mode2", "pose"}
    # shuffled posterior rows are matched back by name: same numbers
    shuffled = posterior.sample(frac=1.0, random_state=1)
    again = evaluate_tables(as_table(shuffled), as_table(truth))
    assert again["latents"]["defocus"]["pearson_r"] == pytest.approx(defocus["pearson_r"])
    assert again["pose"]["mean_error_deg"] == pytest.approx(pose["mean_error_deg"])


def test_pose_coverage_uses_the_credible_radius_columns():
    # Every pose is 3 deg off; chi_3 x std (2 deg) would cover all at both levels.
    posterior, truth = make_tables(n=100)
    posterior["cryosviPoseRadius68Deg"] = np.where(np.arange(100) < 30, 3.5, 2.5)
    posterior["cryosviPoseRadius95Deg"] = np.where(np.arange(100) < 80, 3.5, 2.5)
    pose = evaluate_tables(as_table(posterior), as_table(truth))["pose"]
    assert pose["coverage68"] == pytest.approx(0.30) and pose["coverage95"] == pytest.approx(0.80)
    assert pose["coverage95_interval"] == "cryosviPoseRadius95Deg"
    # without them: chi_3 x std, and the calibration curve always is
    pose = evaluate_tables(as_table(posterior.drop(columns=["cryosviPoseRadius68Deg"])),
                           as_table(truth))["pose"]
    assert pose["coverage68"] == 1.0 and pose["coverage68_interval"] == "chi3 x cryosviPoseStdDeg"


def test_missing_std_columns_skip_coverage():
    posterior, truth = make_tables(k=2)
    posterior = posterior.drop(columns=["cryosviModeAmplitudeStd2", "cryosviPoseStdDeg",
                                        "cryosviModeAmplitude2"])
    metrics = evaluate_tables(as_table(posterior), as_table(truth))
    assert metrics["pose"]["coverage95"] is None
    assert metrics["latents"]["mode1"]["coverage95"] is not None
    assert "mode2" not in metrics["latents"]
    assert set(metrics["calibration"]) == {"levels", "defocus", "mode1"}
    skipped = " ".join(metrics["skipped"])
    assert "cryosviPoseStdDeg" in skipped and "cryosviModeAmplitude2" in skipped


def write_pair(directory, posterior, truth):
    optics = optics_table(Optics())
    write_star(directory / "posterior.star", posterior, optics)
    write_star(directory / "truth.star", truth, optics)
    return ["evaluate", "--posterior", str(directory / "posterior.star"),
            "--truth", str(directory / "truth.star"), "-o", str(directory / "eval")]


def test_cli_end_to_end(tmp_path, capsys):
    posterior, truth = make_tables(n=300, k=1, calibrated=False)
    argv = write_pair(tmp_path, posterior, truth)
    assert main(argv) == 0
    (tmp_path / "eval" / "metrics.json").write_text("stale")  # replaced with --force
    assert main([*argv, "--force"]) == 0
    out = capsys.readouterr().out
    assert "defocus" in out and "mode1" in out and "median" in out
    for name in PLOT_FILES:
        data = (tmp_path / "eval" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = evaluate_tables(read_particles(tmp_path / "posterior.star"),
                               read_particles(tmp_path / "truth.star"))
    assert metrics["latents"]["mode1"]["rmse"] == pytest.approx(
        expected["latents"]["mode1"]["rmse"])
    assert metrics["coverage_levels"] == {"coverage68": 0.68, "coverage95": 0.95}
    # stds 5x too small: coverage far below nominal
    assert metrics["latents"]["defocus"]["coverage95"] < 0.5
    assert not [p for p in (tmp_path / "eval").iterdir() if ".partial" in p.name]


def drop(column):
    return lambda p, t: (p.drop(columns=[column]), t)


@pytest.mark.parametrize("damage, message", [
    (lambda p, t: (p.drop(columns=["rlnImageName"]), t),
     "posterior.star has no rlnImageName.*--match-by-order"),
    (lambda p, t: (p, t.drop(columns=["rlnImageName"])),
     "truth.star has no rlnImageName.*--match-by-order"),
    (lambda p, t: (p.drop(columns=["rlnDefocusU", "rlnDefocusV", "cryosviModeAmplitude1",
                                   "rlnAngleTilt"]), t), "nothing to score"),
    (lambda p, t: (p.assign(rlnImageName=p["rlnImageName"].str.replace("@", "@x")), t),
     "different particles"),
    (lambda p, t: (p.assign(rlnDefocusU=np.nan), t), "rlnDefocusU"),
    (lambda p, t: (p.assign(cryosviPoseStdDeg=-1.0), t), "negative"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, damage, message):
    posterior, truth = damage(*make_tables(n=60, k=1))
    argv = write_pair(tmp_path, posterior, truth)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cryosvi evaluate: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "eval").exists()


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(CryosviError, match="not found"):
        read_particles(tmp_path / "nope.star")
    assert main(["evaluate", "--posterior", str(tmp_path / "nope.star"), "--truth",
                 str(tmp_path / "nope.star"), "-o", str(tmp_path / "e")]) == 2


def test_a_relion_refinement_as_truth_scores_what_it_has(tmp_path, capsys):
    """A truth without mode amplitudes (a RELION refinement): pose and defocus are
    scored, the mode is skipped."""
    posterior, truth = make_tables(n=80, k=1)
    truth = truth.drop(columns=["cryosviModeAmplitude1"])
    argv = write_pair(tmp_path, posterior, truth)
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["latents"]) == {"defocus"}
    assert metrics["pose"]["median_error_deg"] == pytest.approx(3.0, abs=1e-4)
    assert any("cryosviModeAmplitude1" in s for s in metrics["skipped"])


def test_truth_without_angles_skips_the_pose(tmp_path, capsys):
    posterior, truth = make_tables(n=50, k=1)
    argv = write_pair(tmp_path, posterior, truth.drop(columns=["rlnAngleTilt"]))
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["pose"] is None and "mode1" in metrics["latents"]
    assert "pose: no rlnAngleRot/Tilt/Psi in both files" in metrics["skipped"]


def test_row_order_only_when_asked(tmp_path, capsys):
    posterior, truth = make_tables(n=40, k=1)
    argv = write_pair(tmp_path, posterior.drop(columns=["rlnImageName"]), truth)
    assert main(argv) == 2
    assert main([*argv, "--match-by-order"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["matched_by"] == "row order"


# ------------------------------------------------------- frame alignment and junk rows


def relion_matrices(angles):
    return euler_to_matrix(*torch.tensor(angles, dtype=torch.float64).unbind(-1)).numpy()


def angles_of(matrices):
    return torch.stack(matrix_to_euler(torch.tensor(matrices)), -1).numpy()


def test_frame_alignment_recovers_a_frame_that_turns_with_the_conformation():
    # The posterior sees the molecule turned by G(c) = exp(g0 + c g1) (scipy's rotation
    # vectors, not roma's), each pose also off by its own 0.5 deg isotropic error, and 5 %
    # of the poses are wrong views: the fit gives g0 and g1 back, and the aligned errors
    # are the 0.5 deg errors alone.
    rng = np.random.default_rng(3)
    n = 400
    truth = random_angles(n, rng)
    conformation = rng.uniform(0, 30, n)
    g0, g1 = np.array([1.5, -0.5, 0.8]), np.array([0.08, 0.0, -0.1])
    frame = Rotation.from_rotvec(np.deg2rad(g0 + conformation[:, None] * g1)).as_matrix()
    own = Rotation.from_rotvec(np.deg2rad(rng.normal(0, 0.5, (n, 3)))).as_matrix()
    predicted = angles_of(own @ relion_matrices(truth) @ frame.transpose(0, 2, 1))
    wrong = rng.choice(n, 20, replace=False)
    predicted[wrong] = random_angles(20, rng)
    coefficients, errors, fitted = frame_alignment(truth, predicted, conformation[:, None])
    np.testing.assert_allclose(coefficients[0], g0, atol=0.1)
    np.testing.assert_allclose(coefficients[1], g1, atol=0.006)
    assert not fitted[wrong].any() and fitted.sum() >= n - 25
    right = np.setdiff1d(np.arange(n), wrong)
    own_error = np.rad2deg(Rotation.from_matrix(own[right]).magnitude())
    np.testing.assert_allclose(errors[right], own_error, atol=0.1)
    raw = euler_geodesic_error(truth, predicted)
    assert np.median(raw) > 2.5 * np.median(errors)
    # through evaluate_tables, with the truth's conformation column
    names = [f"{i + 1:06d}@stack.mrcs" for i in range(n)]
    columns = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    truth_table = pd.DataFrame(truth, columns=columns).assign(
        rlnImageName=names, cryosviTrueConformation=conformation)
    posterior = pd.DataFrame(predicted, columns=columns).assign(
        rlnImageName=names, cryosviPoseStdDeg=0.5)
    pose = evaluate_tables(as_table(posterior), as_table(truth_table))["pose"]
    aligned = pose["frame_aligned"]
    assert aligned["covariates"] == ["cryosviTrueConformation"]
    assert aligned["median_error_deg"] == pytest.approx(np.median(errors))
    assert pose["median_error_deg"] == pytest.approx(np.median(raw))
    # 95 % of chi_3 x 0.5 deg covers the aligned errors of the right views only
    assert aligned["coverage95"] == pytest.approx(0.95 * 380 / 400, abs=0.03)
    assert pose["coverage95"] < 0.3


def test_frame_alignment_leaves_errors_that_no_frame_explains():
    # Every pose 3 deg off about the viewing axis: a different molecule-frame axis for
    # each view, which one rotation of the frame cannot take out.
    posterior, truth = make_tables(n=300, k=0)
    pose = evaluate_tables(as_table(posterior), as_table(truth))["pose"]
    aligned = pose["frame_aligned"]
    assert aligned["covariates"] == []
    assert np.linalg.norm(aligned["rotation_deg"]) < 0.5
    assert aligned["median_error_deg"] == pytest.approx(3.0, rel=0.03)
    # too few particles to fit a frame: said, not guessed
    few = evaluate_tables(as_table(posterior[:8]), as_table(truth[:8]))
    assert few["pose"]["frame_aligned"] is None
    assert any("frame alignment" in reason for reason in few["skipped"])


def test_junk_rows_are_left_out_and_their_probability_is_ranked():
    posterior, truth = make_tables(n=120, k=1, seed=4)
    rng = np.random.default_rng(5)
    is_junk = np.zeros(120, bool)
    is_junk[rng.choice(120, 15, replace=False)] = True
    truth["cryosviTrueJunk"] = is_junk.astype(int)
    junk_posterior = posterior.copy()
    junk_posterior.loc[is_junk, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = \
        random_angles(15, rng)
    junk_posterior.loc[is_junk, "rlnDefocusU"] = 30000.0
    p = np.clip(rng.normal(np.where(is_junk, 0.7, 0.2), 0.2), 0, 1)
    p[:3] = 0.5  # ties
    junk_posterior["cryosviJunkProbability"] = p
    metrics = evaluate_tables(as_table(junk_posterior), as_table(truth))
    alone = evaluate_tables(as_table(posterior[~is_junk]), as_table(truth[~is_junk]))
    assert metrics["n_particles"] == 105
    assert metrics["pose"]["mean_error_deg"] == pytest.approx(alone["pose"]["mean_error_deg"])
    assert metrics["latents"]["defocus"]["rmse"] == pytest.approx(
        alone["latents"]["defocus"]["rmse"])
    # AUC: the fraction of (junk, real) pairs ranked right, ties half, by brute force
    pairs = p[is_junk][:, None] - p[~is_junk][None, :]
    expected = np.mean((pairs > 0) + 0.5 * (pairs == 0))
    junk = metrics["junk"]
    assert junk["auc"] == pytest.approx(expected)
    assert junk["particles"] == 15 and junk["real_particles"] == 105
    assert junk["real_above_half"] == pytest.approx(np.mean(p[~is_junk] > 0.5))
    assert "junk" in format_table(metrics)
    assert alone["junk"]["particles"] == 0 and alone["junk"]["auc"] is None
    assert evaluate_tables(as_table(posterior), as_table(truth.drop(
        columns="cryosviTrueJunk")))["junk"] is None


def test_a_subset_of_the_truth_is_scored_on_its_own_rows():
    """A posterior of some of the truth's particles (``infer --max-junk`` writes one) is
    scored on its rows, as those rows alone would be, and says how many it left out."""
    posterior, truth = make_tables(n=60, k=1)
    keep = np.arange(60) % 3 != 0
    whole = evaluate_tables(as_table(posterior[keep]), as_table(truth[keep]))
    part = evaluate_tables(as_table(posterior[keep]), as_table(truth))
    assert part["n_particles"] == 40 and part["truth_particles"] == 60
    for name in ("defocus", "mode1"):
        assert part["latents"][name] == whole["latents"][name]
    assert part["pose"]["median_error_deg"] == whole["pose"]["median_error_deg"]
    assert "20 of the truth's 60 particles are not in the posterior" in format_table(part)
    assert "not in the posterior" not in format_table(whole)
    other = posterior.assign(rlnImageName=posterior["rlnImageName"].str.replace("@", "@x"))
    with pytest.raises(CryosviError, match="different particles"):
        evaluate_tables(as_table(other), as_table(truth))
