"""What cryosvi may overwrite: outputs are checked before any work, and an existing file
or directory is replaced only with ``--force`` and only when cryosvi made it.

How cryosvi recognises what it made (its provenance):

* a directory (data set, run, report, demo, movie folder): a ``.cryosvi`` marker file in
  it, a JSON object ``{"cryosvi": version, "kind": ...}`` written when it was created
  (run directories of earlier versions: a ``run.json`` with a "cryosvi" key; demos: a
  ``demo.json``);
* an ``.npz``: a ``cryosvi`` entry (a JSON string with the kind); earlier versions:
  exactly the arrays of a reference or of posterior samples;
* a ``.json``: a top-level "cryosvi" key;
* a STAR file: a ``cryosvi...`` column (every STAR cryosvi writes has one: mode
  amplitudes in a simulated set, posterior std columns in a posterior);
* a cryoSPARC ``.cs`` (written by ``infer`` beside its STAR from a .cs input): the STAR of
  the same name beside it is a cryosvi posterior.

Each output has a kind (e.g. 'posterior' for a STAR of ``infer``, 'particles' for one of
``simulate``, 'reference' or 'samples' for an .npz); ``--force`` replaces only an output
of the same kind, so a posterior never replaces a simulated ground truth or a reference.
An output is never an input of the same command, with or without ``--force``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cryosvi import __version__
from cryosvi.errors import CryosviError

MARKER = ".cryosvi"
LEGACY_NPZ = {
    "reference": {"coords", "centroid", "modes", "eigenvalues", "settings"},
    "samples": {"rotation", "defocus", "enm_scale", "weights"},
}
"""Arrays of .npz files written before the 'cryosvi' entry (samples: a subset)."""
STAR_HEAD_BYTES = 1 << 16
"""STAR column labels are read from at most this much of the file's start."""


def provenance(kind: str, **extra) -> dict:
    """The record that marks an output as cryosvi's: {"cryosvi": version, "kind": kind}."""
    return {"cryosvi": __version__, "kind": kind, **extra}


def provenance_array(kind: str) -> np.ndarray:
    """The ``cryosvi`` entry of an .npz output (a JSON string, no pickle needed)."""
    return np.array(json.dumps(provenance(kind)))


# ---------------------------------------------------------------------- recognising
def directory_kind(path: str | Path) -> str | None:
    """The kind recorded in a directory cryosvi made, else None."""
    path = Path(path)
    marker = _json_object(path / MARKER)
    if marker is not None:
        return str(marker.get("kind", "directory"))
    run = _json_object(path / "run.json")
    if run is not None and "cryosvi" in run:
        return "run"
    if (path / "demo.json").is_file():
        return "demo"
    return None


def file_kind(path: str | Path) -> str | None:
    """The kind of a file cryosvi made (see the module docstring), else None."""
    path = Path(path)
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz_kind(path)
    if suffix == ".json":
        record = _json_object(path)
        return str(record.get("kind", "json")) if record and "cryosvi" in record else None
    if suffix == ".star":
        return _star_kind(path)
    if suffix == ".cs" and _star_kind(path.with_suffix(".star")) == "posterior":
        return "posterior"
    return None


def _json_object(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _npz_kind(path: Path) -> str | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            if "cryosvi" in names:
                record = json.loads(str(data["cryosvi"]))
                return str(record.get("kind", "npz")) if isinstance(record, dict) else None
    except Exception:  # not an .npz at all: not cryosvi's
        return None
    if names == LEGACY_NPZ["reference"]:
        return "reference"
    if names and names <= LEGACY_NPZ["samples"]:
        return "samples"
    return None


def _star_kind(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(STAR_HEAD_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    labels = [line.split()[0] for line in head.splitlines() if line.startswith("_cryosvi")]
    if not labels:
        return None
    return "posterior" if any("Std" in label for label in labels) else "particles"


# ------------------------------------------------------------------------- checking
def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (existing or not)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


NAME_MARGIN = 32
"""Bytes of an output's name kept free for the temporary names written beside it
(``.NAME.cryosvi-staging.XXXXXXXX``, ``.STEM.partial.SUFFIX``)."""


def output_path(value: str | os.PathLike, option: str = "-o") -> Path:
    """The path an output option names; an empty name is refused (``Path('')`` would be
    the current folder)."""
    if os.fspath(value) == "":
        raise CryosviError(f"{option} '': an empty name; give the output's name")
    return Path(value)


def check_writable(path: str | os.PathLike, option: str = "-o",
                   directory: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written, with one line that
    says what, where and why.

    The folders above ``path`` that exist must be folders that may be entered, the
    nearest of them must be writable on a writable file system (the output, its missing
    folders and its temporary files are made there), and every name must fit the file
    system with room for the temporary names (``NAME_MARGIN``). With ``directory``, an
    existing ``path`` must moreover be a folder that may be listed and written into.
    Whether an existing output may be replaced is not decided here
    (``check_output_file``, ``check_output_directory``). Returns ``path`` as a Path.
    """
    path = output_path(path, option)
    where = f"cannot write {option} {_shorter(str(path))}"
    absolute = Path(os.path.abspath(path))
    # The nearest existing folder above the output: stat each ancestor, treating what
    # is missing or unreachable as absent; the first one found says why.
    ancestor = absolute.parent
    while True:
        try:
            status = os.stat(ancestor)
            break
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            pass
        except OSError as error:
            if error.errno != errno.ENAMETOOLONG:
                raise CryosviError(f"{where}: {_reason(error)} ({ancestor})") from None
        if ancestor.parent == ancestor:
            raise CryosviError(f"{where}: no folder above it can be read")
        ancestor = ancestor.parent
    if not stat.S_ISDIR(status.st_mode):
        raise CryosviError(f"{where}: {ancestor} is a file, not a directory")
    _check_names(absolute, ancestor, where)
    _check_access(ancestor, os.W_OK | os.X_OK, where)
    if directory:
        try:
            status = os.stat(absolute)
        except (FileNotFoundError, NotADirectoryError):
            return path
        except OSError as error:
            raise CryosviError(f"{where}: {_reason(error)}") from None
        if stat.S_ISDIR(status.st_mode):
            _check_access(absolute, os.R_OK | os.W_OK | os.X_OK, where)
    return path


def _shorter(text: str, limit: int = 120) -> str:
    """``text`` with its middle left out when longer than ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 4:]}"


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


def _check_access(folder: Path, mode: int, where: str) -> None:
    """``folder`` allows ``mode`` (os.R_OK, W_OK, X_OK) to this process, else one line:
    a read-only file system, a folder that may not be entered, listed or written."""
    if os.access(folder, mode):
        return
    if mode & os.W_OK and hasattr(os, "statvfs"):  # POSIX
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only:
            raise CryosviError(f"{where}: {folder} is on a read-only file system")
    if not os.access(folder, os.X_OK):
        why = "may not be entered"
    elif mode & os.R_OK and not os.access(folder, os.R_OK):
        why = "may not be listed"
    else:
        why = "is not writable"
    raise CryosviError(f"{where}: permission denied ({folder} {why})")


def _check_names(path: Path, ancestor: Path, where: str) -> None:
    """The names below ``ancestor`` fit its file system (NAME_MAX, PATH_MAX), the last
    one with ``NAME_MARGIN`` bytes to spare."""
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
        path_max = os.pathconf(ancestor, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf: Windows
        name_max, path_max = 255, 4096
    parts = path.relative_to(ancestor).parts
    for i, name in enumerate(parts):
        size = len(os.fsencode(name))
        room = name_max - (NAME_MARGIN if i == len(parts) - 1 else 0)
        if size > room:
            raise CryosviError(f"{where}: the name {name[:16]}... is {size} bytes long; "
                               f"the file system allows {room} here")
    if len(os.fsencode(path)) + NAME_MARGIN > path_max:
        raise CryosviError(f"{where}: the path is longer than the "
                           f"{path_max - NAME_MARGIN} bytes the file system allows here")


def refuse_inputs(path: Path, inputs, option: str = "-o") -> None:
    """A CryosviError when the output ``path`` is one of the command's ``inputs``."""
    for source in inputs:
        if source is not None and same_path(path, source):
            raise CryosviError(f"{option} {path} is also an input of this command; choose "
                               "another output name")


def check_output_file(path: str | Path, kind: str, force: bool = False,
                      inputs=(), option: str = "-o") -> Path:
    """Refuse, before any work, an output file that cannot or may not be written.

    Refused always: an empty name, an input of the command (``inputs``), a directory, a
    place that cannot be written (``check_writable``). Refused without ``force``: an
    existing file. Refused even with ``force``: an existing file that is not a cryosvi
    output of this ``kind``.
    """
    path = output_path(path, option)
    refuse_inputs(path, inputs, option)
    check_writable(path, option)
    if path.is_dir():
        raise CryosviError(f"{option} {path} is a directory; give a file name")
    if path.exists() or path.is_symlink():
        if not force:
            raise CryosviError(f"{path} exists; use --force to replace it")
        found = file_kind(path)
        if found != kind:
            made = f"a cryosvi {found} file" if found else "not written by cryosvi"
            raise CryosviError(f"{path} is {made}; --force replaces only a cryosvi {kind} "
                               "file, so remove it yourself or choose another name")
    return path


def check_output_directory(path: str | Path, kind: str, force: bool = False,
                           inputs=(), option: str = "-o") -> bool:
    """Refuse, before any work, an output directory that cannot or may not be written.

    Returns whether it exists with content (then ``force`` was given and cryosvi made it,
    with this ``kind``). An empty existing directory is used as it is. ``inputs`` may not
    lie inside a directory that would be replaced.
    """
    path = check_writable(path, option, directory=True)
    if path.exists() and not path.is_dir():
        raise CryosviError(f"{option} {path} exists and is not a directory")
    if not path.is_dir() or not any(path.iterdir()):
        return False
    found = directory_kind(path)
    if found is None:
        raise CryosviError(f"{path} exists and was not made by cryosvi (no {MARKER} "
                           "marker); --force replaces only cryosvi's directories, so "
                           "choose another output or empty it yourself")
    if not force:
        raise CryosviError(f"{path} exists; use --force to replace it")
    if found != kind:
        article = "an" if kind[:1] in "aeiou" else "a"
        raise CryosviError(f"{path} is a cryosvi {found} directory; --force replaces "
                           f"only {article} {kind} directory here")
    for source in inputs:
        if source is not None and Path(source).resolve().is_relative_to(path.resolve()):
            raise CryosviError(f"input {source} lies inside {path}, which --force would "
                               "replace; choose another output")
    return True


def mark_directory(path: str | Path, kind: str, **extra) -> None:
    """Record that cryosvi made ``path`` (the ``.cryosvi`` marker)."""
    Path(path, MARKER).write_text(json.dumps(provenance(kind, **extra)) + "\n")


def remove_directory(path: str | Path) -> None:
    """Delete a directory cryosvi made (``directory_kind`` is not None), nothing else."""
    path = Path(path)
    if directory_kind(path) is None:
        raise CryosviError(f"refusing to delete {path}: not made by cryosvi")
    shutil.rmtree(path)


# ------------------------------------------------------------------------- staging
def staging_prefix(output: Path) -> str:
    return f".{output.name}.cryosvi-staging."


def make_staging(output: Path) -> Path:
    """A hidden folder beside ``output`` to build it in, marked with this process id."""
    import tempfile

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(output), dir=output.parent))
    mark_directory(staging, "staging", pid=os.getpid())
    return staging


@contextmanager
def staged_directory(output: Path, kind: str, replace: bool, command: str):
    """Build the folder ``output`` whole or not at all: yields a fresh staging folder
    beside it (``make_staging``; the staging folders a killed ``command`` left are
    removed first, with a note); when the body returns, the folder is marked as made by
    cryosvi (``kind``) and renamed into place, replacing ``output`` if ``replace`` (a
    folder cryosvi made: ``remove_directory``) or an empty folder there; on any error it
    is deleted and ``output`` is left as it was."""
    for stale in remove_stale_staging(output):
        print(f"note: removed {stale}, left by an interrupted {command}", file=sys.stderr)
    staging = make_staging(output)
    try:
        yield staging
        mark_directory(staging, kind)
        if replace:
            remove_directory(output)
        elif output.is_dir():
            output.rmdir()  # empty (checked by the caller)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def remove_stale_staging(output: Path) -> list[Path]:
    """Delete the staging folders of ``output`` left by a killed cryosvi (marked
    'staging' by a process that no longer runs). Returns the folders removed."""
    removed = []
    if not output.parent.is_dir():
        return removed
    for candidate in output.parent.glob(staging_prefix(output) + "*"):
        marker = _json_object(candidate / MARKER)
        if (candidate.is_dir() and marker and marker.get("kind") == "staging"
                and not _process_alive(marker.get("pid"))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _process_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
