"""``cryosvi inspect`` on a RELION 3.0 file and a .cs file, and its PNG."""

import warnings

from cryosvi.cli.main import main
from particle_files import write_cs, write_relion30, write_relion31


def run(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_relion30_report(tmp_path, capsys):
    path = write_relion30(tmp_path)
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0
    assert "RELION 3.0 STAR (one table), 4 particles, 2 optics group(s)" in out
    assert "group 1: 1 particles, 200 kV" in out and "group 2: 3 particles, 300 kV" in out
    assert "pixel 5 Å, box 8 px" in out
    assert "present: poses yes, shifts yes, CTF (defocus) yes" in out
    assert "defocus: U 9000 to 9300 Å, V 8800 to 9100 Å" in out
    assert "stacks: all 1 found" in out


def test_cs_report_and_missing_stacks(tmp_path, capsys):
    path, _, _ = write_cs(tmp_path)
    (tmp_path / "J5").mkdir()  # as in a cryoSPARC project: the .cs in its job's folder
    path = path.rename(tmp_path / "J5" / path.name)
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0 and "cryoSPARC .cs, 4 particles, 1 optics group(s)" in out
    assert "stacks: 1 of 1 not found (J3/extract/s.mrcs); give --datadir" in out
    code, out, _ = run(["inspect", str(path), "--datadir", str(tmp_path)], capsys)
    assert code == 0 and "stacks: all 1 found" in out


def test_png_is_written_and_never_replaces_a_foreign_file(tmp_path, capsys):
    path = write_relion31(tmp_path)
    png = tmp_path / "particles.png"
    code, out, _ = run(["inspect", str(path), "-o", str(png), "--count", "3"], capsys)
    assert code == 0 and "wrote the first 3 particle(s)" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"cryosvi inspect" in data
    assert run(["inspect", str(path), "-o", str(png)], capsys)[0] == 0  # its own: replaced
    mine = b"\x89PNG\r\n\x1a\n my picture"
    png.write_bytes(mine)
    code, _, err = run(["inspect", str(path), "-o", str(png)], capsys)
    assert code == 2 and "not written by cryosvi inspect" in err
    assert png.read_bytes() == mine
    assert run(["inspect", str(path), "-o", str(png), "--force"], capsys)[0] == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.read_bytes() != mine
    # never the input, nor a file that is not a PNG, even with --force
    before = path.read_bytes()
    code, _, err = run(["inspect", str(path), "-o", str(path), "--force"], capsys)
    assert code == 2 and "also an input" in err and path.read_bytes() == before
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"my notes")
    code, _, err = run(["inspect", str(path), "-o", str(notes), "--force"], capsys)
    assert code == 2 and "is not a PNG" in err and notes.read_bytes() == b"my notes"
    code, _, err = run(["inspect", str(path), "-o", str(tmp_path / "p.txt")], capsys)
    assert code == 2 and "ending in .png" in err and not (tmp_path / "p.txt").exists()
