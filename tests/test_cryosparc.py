"""cryoSPARC .cs: fields in RELION terms, the pose convention pinned on closed forms and
on scipy, the .cs writer, and bad files."""

import pickle

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryosvi.io.cryosparc import euler_to_pose, pose_to_euler
from cryosvi.io.particles import CryosviWarning, read_particles, write_particles
from cryosvi.physics.rotations import euler_to_matrix
from particle_files import CS_DTYPE, cs_array, write_cs


def test_fields_in_relion_terms(tmp_path):
    path, array, images = write_cs(tmp_path)
    ps = read_particles(path, datadir=tmp_path)  # blob/path is relative to the project
    frame = ps.metadata
    assert ps.source == "cryosparc" and len(ps) == 4 and len(ps.optics) == 1
    # blob/idx is 0-based, '>' stripped: reversed order here
    assert frame["rlnImageName"].tolist() == [f"{i:06d}@J3/extract/s.mrcs"
                                              for i in (4, 3, 2, 1)]
    np.testing.assert_array_equal(ps.images([0, 3]), images[[3, 0]])
    np.testing.assert_allclose(frame["rlnDefocusU"], array["ctf/df1_A"])
    np.testing.assert_allclose(frame["rlnDefocusV"], array["ctf/df2_A"])
    np.testing.assert_allclose(frame["rlnDefocusAngle"], np.rad2deg(array["ctf/df_angle_rad"]))
    np.testing.assert_allclose(frame["rlnPhaseShift"], np.rad2deg(0.5), rtol=1e-6)
    np.testing.assert_allclose(frame["rlnCtfBfactor"], 20.0)
    np.testing.assert_allclose(frame["rlnAmplitudeContrast"], 0.07, rtol=1e-6)
    assert frame["rlnImageSize"].tolist() == [8] * 4
    np.testing.assert_allclose(frame["rlnOriginXAngst"], array["alignments3D/shift"][:, 0] * 1.5)
    np.testing.assert_allclose(frame["rlnOriginYAngst"], array["alignments3D/shift"][:, 1] * 1.5)
    assert frame["uid"].tolist() == array["uid"].tolist()  # other fields kept


@pytest.mark.parametrize("pose, expected", [
    # R(pose) = Rz(30 deg); RELION's A = R^T = Rz(-30) is psi = 30 (rot 0 at tilt 0)
    ((0.0, 0.0, np.radians(30)), (0.0, 0.0, 30.0)),
    # R(pose) = Ry(40 deg); A = Ry(-40) is RELION's tilt 40
    ((0.0, np.radians(40), 0.0), (0.0, 40.0, 0.0)),
])
def test_pose_convention_closed_forms(pose, expected):
    angles = np.array(pose_to_euler(np.array([pose]))).ravel()
    np.testing.assert_allclose(angles, expected, atol=1e-9)


def test_pose_convention_against_scipy():
    """A (RELION's Euler_angles2matrix of the angles read) = R(pose)^T, with R from
    scipy's rotation vectors (cryoDRGN's expmap(pose).T, pyem's rot2euler(expmap))."""
    pose = np.random.default_rng(3).normal(size=(50, 3))
    rot, tilt, psi = pose_to_euler(pose)
    relion = euler_to_matrix(*(torch.as_tensor(a) for a in (rot, tilt, psi))).numpy()
    np.testing.assert_allclose(relion, Rotation.from_rotvec(pose).as_matrix().transpose(0, 2, 1),
                               atol=1e-12)
    back = euler_to_pose(rot, tilt, psi)
    np.testing.assert_allclose(Rotation.from_rotvec(back).as_matrix(),
                               Rotation.from_rotvec(pose).as_matrix(), atol=1e-12)


def test_cs_writer_updates_fields(tmp_path):
    path, array, _ = write_cs(tmp_path)
    ps = read_particles(path, datadir=tmp_path)
    frame = ps.metadata.copy()
    frame["rlnAngleTilt"] = 33.0
    frame["rlnDefocusU"] += 100
    frame["rlnOriginXAngst"] = 3.0
    (tmp_path / "out").mkdir()
    written = write_particles(tmp_path / "out" / "post.star", ps, frame, [])
    assert written == [tmp_path / "out" / "post.star", tmp_path / "out" / "post.cs"]
    out = np.load(tmp_path / "out" / "post.cs", allow_pickle=False)
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out["uid"], array["uid"])
    np.testing.assert_allclose(out["ctf/df1_A"], array["ctf/df1_A"] + 100, rtol=1e-6)
    np.testing.assert_allclose(out["alignments3D/shift"][:, 0], 2.0)  # 3 Å / 1.5 Å
    again = read_particles(tmp_path / "out" / "post.cs", datadir=tmp_path)
    np.testing.assert_allclose(again.metadata["rlnAngleTilt"], 33.0, atol=1e-4)
    star = read_particles(tmp_path / "out" / "post.star", datadir=tmp_path)
    np.testing.assert_allclose(star.metadata["rlnAngleTilt"], 33.0)


def test_missing_amplitude_contrast_defaults_with_a_warning(tmp_path):
    array = cs_array(2)
    names = [n for n in array.dtype.names if n != "ctf/amp_contrast"]
    with open(tmp_path / "p.cs", "wb") as handle:
        np.save(handle, array[names].copy(), allow_pickle=False)
    with pytest.warns(CryosviWarning, match="amplitude contrast.*0.1"):
        ps = read_particles(tmp_path / "p.cs")
    np.testing.assert_allclose(ps.metadata["rlnAmplitudeContrast"], 0.1)


def test_bad_cs_files(tmp_path, capsys):
    from cryosvi.cli.main import main

    marker = tmp_path / "ran"

    def save(path, array, **kwargs):
        with open(path, "wb") as handle:
            np.save(handle, array, **kwargs)

    def savez(path):
        with open(path, "wb") as handle:
            np.savez(handle, x=np.arange(3))

    objects = np.array([(b"x", 1)], dtype=[("blob/path", "O"), ("blob/idx", "<u4")])
    cases = {
        # an older .cs with object fields: loading it would need pickle
        "objects.cs": lambda p: save(p, objects, allow_pickle=True),
        "archive.cs": savez,
        "fields.cs": lambda p: save(p, np.zeros(2, dtype=CS_DTYPE[:3])),
        "pickle.cs": lambda p: p.write_bytes(pickle.dumps(str(marker))),
    }
    messages = {"objects.cs": "Python objects", "archive.cs": "no numpy header",
                "fields.cs": "missing .cs field", "pickle.cs": "no numpy header"}
    for name, make in cases.items():
        make(tmp_path / name)
        assert main(["inspect", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and messages[name] in err, err
    assert not marker.exists()
