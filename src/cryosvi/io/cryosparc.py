"""cryoSPARC ``.cs`` particle files: a numpy structured array (``np.save`` format), one
record per particle, read with ``allow_pickle=False`` (a file holding Python objects is
refused, never unpickled).

Fields (cryoSPARC's names) and their RELION 3.1 terms:

==========================  =====================================================
``blob/path``               stack file (a leading ``>`` is stripped)
``blob/idx``                0-based image index -> ``rlnImageName`` ``idx+1@path``
``blob/psize_A``            ``rlnImagePixelSize`` (Å)
``blob/shape``              (ny, nx) -> ``rlnImageSize``
``ctf/accel_kv``            ``rlnVoltage``; ``ctf/cs_mm`` -> ``rlnSphericalAberration``
``ctf/amp_contrast``        ``rlnAmplitudeContrast``
``ctf/df1_A``, ``df2_A``    ``rlnDefocusU``, ``rlnDefocusV`` (Å)
``ctf/df_angle_rad``        ``rlnDefocusAngle`` (radians -> degrees)
``ctf/phase_shift_rad``     ``rlnPhaseShift`` (radians -> degrees)
``ctf/bfactor``             ``rlnCtfBfactor`` (Å^2)
``alignments3D/pose``       rotation vector -> ``rlnAngleRot/Tilt/Psi`` (see below)
``alignments3D/shift``      pixels -> ``rlnOriginXAngst/YAngst`` (times blob/psize_A)
==========================  =====================================================

The pose convention, from two independent public readers of ``.cs`` files:

* cryoDRGN ``parse_pose_star`` turns RELION angles into ``R_from_relion(rot, tilt, psi)``,
  which is ``Rz(psi) Ry(-tilt) Rz(rot)`` with the (0,1), (1,0), (1,2), (2,1) entries
  negated, i.e. ``D Rz(psi) Ry(-tilt) Rz(rot) D`` with D = diag(1, -1, 1) = RELION's
  ``Euler_angles2matrix`` A (``src/euler.cpp``). Its ``parse_pose_csparc`` gives the same
  quantity from a ``.cs`` as ``expmap(pose).T`` (``lie_tools.expmap``: Rodrigues' formula
  with the standard cross-product matrix). So A = R(pose)^T.
* pyem ``csparc2star`` (``metadata/cryosparc2.py``) writes RELION angles
  ``rot2euler(expmap(pose))``; pyem's ``expmap`` builds the *transposed* cross-product
  matrix, i.e. returns R(pose)^T, and ``rot2euler`` inverts ``euler2rot``, which is
  RELION's A. Again A = R(pose)^T.

Both copy ``alignments3D/shift`` (pixels) to ``rlnOriginX/Y`` (pixels) unchanged, so
``rlnOriginXAngst = shift[0] * psize``, ``rlnOriginYAngst = shift[1] * psize``. The tests
pin these on closed forms (a pose about z is psi, about y is tilt).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import roma
import torch

from cryosvi.errors import CryosviError
from cryosvi.io.atomic import write_atomically
from cryosvi.physics.rotations import euler_to_matrix, matrix_to_euler

REQUIRED = ("blob/path", "blob/idx", "blob/psize_A", "ctf/accel_kv", "ctf/cs_mm")
SCALARS = {"ctf/accel_kv": "rlnVoltage", "ctf/cs_mm": "rlnSphericalAberration",
           "ctf/amp_contrast": "rlnAmplitudeContrast", "ctf/df1_A": "rlnDefocusU",
           "ctf/df2_A": "rlnDefocusV", "ctf/bfactor": "rlnCtfBfactor",
           "blob/psize_A": "rlnImagePixelSize"}
RADIANS = {"ctf/df_angle_rad": "rlnDefocusAngle", "ctf/phase_shift_rad": "rlnPhaseShift"}
POSE, SHIFT = "alignments3D/pose", "alignments3D/shift"


def load_cs(path) -> np.ndarray:
    """The structured array of a ``.cs`` file (no pickle), or a one-line CryosviError."""
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":  # the .npy magic string
            raise CryosviError(f"{path} is not a cryoSPARC .cs file (no numpy header)")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise CryosviError(f"{path} holds Python objects (an older cryoSPARC .cs); "
                               "cryosvi does not unpickle data files: export the particles "
                               "again from cryoSPARC or convert them to STAR") from None
        raise CryosviError(f"{path} is not a cryoSPARC .cs file: {error}") from None
    except Exception as error:  # noqa: BLE001 - numpy's header parser (ast, tokenize)
        # raises assorted errors on damaged bytes; any of them means "not a .cs file"
        raise CryosviError(f"{path} is not a cryoSPARC .cs file: "
                           f"{type(error).__name__}") from None
    if array.dtype.names is None or array.ndim != 1:
        raise CryosviError(f"{path} is not a cryoSPARC .cs file (no structured records)")
    return array


def read_cs(path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """(metadata in RELION 3.1 terms with per-row optics, the source array, the RELION
    columns a written STAR keeps) of a ``.cs`` file."""
    array = load_cs(path)
    names = array.dtype.names
    missing = [f for f in REQUIRED if f not in names]
    if missing:
        raise CryosviError(f"{path}: missing .cs field(s) {', '.join(missing)}")
    if len(array) == 0:
        raise CryosviError(f"{path} holds no particles")
    frame = {}
    stack = _strings(array["blob/path"], path)
    stack = stack.str.removeprefix(">")
    index = _numbers(array, "blob/idx", path)
    if (index < 0).any() or (index != np.round(index)).any():
        raise CryosviError(f"{path}: blob/idx must be whole numbers >= 0")
    frame["rlnImageName"] = (pd.Series((index + 1).astype(np.int64)).astype(str).str.zfill(6)
                             + "@" + stack).to_numpy()
    for field, column in SCALARS.items():
        if field in names:
            frame[column] = _numbers(array, field, path)
    for field, column in RADIANS.items():
        if field in names:
            frame[column] = np.rad2deg(_numbers(array, field, path))
    if "blob/shape" in names:
        shape = _numbers(array, "blob/shape", path).reshape(len(array), -1)
        frame["rlnImageSize"] = shape[:, -1]
    columns = ["rlnImageName", *(c for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                                             "rlnPhaseShift", "rlnCtfBfactor") if c in frame)]
    if POSE in names:
        pose = _numbers(array, POSE, path).reshape(len(array), 3)
        rot, tilt, psi = pose_to_euler(pose)
        frame.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi)
        columns += ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    if SHIFT in names:
        shift = _numbers(array, SHIFT, path).reshape(len(array), 2)
        pixel = frame["rlnImagePixelSize"]
        frame["rlnOriginXAngst"] = shift[:, 0] * pixel
        frame["rlnOriginYAngst"] = shift[:, 1] * pixel
        columns += ["rlnOriginXAngst", "rlnOriginYAngst"]
    # Every other one-value field is kept under its own name.
    for field in names:
        if field not in frame and field not in (*SCALARS, *RADIANS, POSE, SHIFT, "blob/path",
                                                "blob/idx", "blob/shape") \
                and array[field].ndim == 1 and array.dtype[field].kind in "biuf":
            frame[field] = array[field]
    return pd.DataFrame(frame), array, columns


def _numbers(array: np.ndarray, field: str, path) -> np.ndarray:
    """A numeric field as float64, finite everywhere, or a CryosviError."""
    if array.dtype[field].kind not in "biuf" and array.dtype[field].subdtype is None:
        raise CryosviError(f"{path}: .cs field {field} is not numeric")
    try:
        values = np.asarray(array[field], dtype=np.float64)
    except (TypeError, ValueError):
        raise CryosviError(f"{path}: .cs field {field} is not numeric") from None
    finite = np.isfinite(values.reshape(len(array), -1)).all(axis=1)
    if not finite.all():
        raise CryosviError(f"{path}: .cs field {field} is not a finite number for particle "
                           f"{int(np.flatnonzero(~finite)[0]) + 1}")
    return values


def _strings(values: np.ndarray, path) -> pd.Series:
    if values.dtype.kind == "S":
        try:
            return pd.Series(np.char.decode(values, "utf-8"))
        except UnicodeDecodeError:
            raise CryosviError(f"{path}: blob/path is not UTF-8 text") from None
    if values.dtype.kind == "U":
        return pd.Series(values)
    raise CryosviError(f"{path}: blob/path is not text")


def pose_to_euler(pose: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cryoSPARC rotation vectors (N, 3) -> RELION (rot, tilt, psi) in degrees:
    A = R(pose)^T (module doc)."""
    matrix = roma.rotvec_to_rotmat(torch.as_tensor(pose, dtype=torch.float64)).transpose(-1, -2)
    return tuple(a.numpy() for a in matrix_to_euler(matrix))


def euler_to_pose(rot, tilt, psi) -> np.ndarray:
    """RELION angles (degrees) -> cryoSPARC rotation vectors (N, 3); inverse of
    :func:`pose_to_euler`."""
    matrix = euler_to_matrix(*(torch.tensor(np.array(a, float)) for a in (rot, tilt, psi)))
    return roma.rotmat_to_rotvec(matrix.transpose(-1, -2)).numpy()


def write_cs(path, source: np.ndarray, frame: pd.DataFrame) -> None:
    """Write a copy of the ``.cs`` array ``source`` with poses, shifts and defocus taken
    from ``frame`` (RELION 3.1 terms, same rows), atomically, to ``path``."""
    updates = {}
    if all(c in frame for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        updates[POSE] = euler_to_pose(frame["rlnAngleRot"], frame["rlnAngleTilt"],
                                      frame["rlnAnglePsi"]).astype(np.float32)
    if "rlnOriginXAngst" in frame:
        pixel = np.asarray(source["blob/psize_A"], float)
        updates[SHIFT] = np.stack([frame["rlnOriginXAngst"].to_numpy(float) / pixel,
                                   frame["rlnOriginYAngst"].to_numpy(float) / pixel],
                                  -1).astype(np.float32)
    for field, column in (("ctf/df1_A", "rlnDefocusU"), ("ctf/df2_A", "rlnDefocusV")):
        if column in frame:
            updates[field] = frame[column].to_numpy(np.float32)
    if "rlnDefocusAngle" in frame:
        updates["ctf/df_angle_rad"] = np.deg2rad(frame["rlnDefocusAngle"].to_numpy(float))
    descr = list(source.dtype.descr)
    for field, values in updates.items():
        if field not in source.dtype.names:
            descr.append((field, values.dtype.str, values.shape[1:]) if values.ndim > 1
                         else (field, values.dtype.str))
    out = np.zeros(len(source), dtype=np.dtype(descr))
    for field in source.dtype.names:
        out[field] = source[field]
    for field, values in updates.items():
        out[field] = values

    def write(temporary):
        with open(temporary, "wb") as handle:
            np.save(handle, out, allow_pickle=False)

    write_atomically(path, write)
