"""not_text: real binaries are refused, text with a BOM or a few stray bytes passes."""

import shutil
import sys

from xpar.data.textcheck import BAD_BYTES_FREE, not_text


def test_a_real_executable_is_not_text(tmp_path):
    shutil.copy(sys.executable, tmp_path / "x.txt")
    assert not_text(str(tmp_path / "x.txt")) == "a NUL byte at offset 7"  # the ELF header


def test_bom_and_stray_latin1_bytes_pass(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello world\n")
    (tmp_path / "latin1.txt").write_bytes(("caf\xe9 cr\xe8me br\xfbl\xe9e\n" * 3).encode("latin-1"))
    (tmp_path / "utf8.txt").write_text("héllo ✓ wörld\n" * 1000, encoding="utf-8")
    # 12 stray bytes: more than 1% of this short file, fewer than the bytes always allowed.
    assert 12 <= BAD_BYTES_FREE
    for name in ("bom.txt", "latin1.txt", "utf8.txt"):
        assert not_text(str(tmp_path / name)) is None, name


def test_many_undecodable_bytes_are_not_text(tmp_path):
    # 5% stray bytes without any NUL: over the 1% share and over the free bytes.
    (tmp_path / "a.txt").write_bytes((b"x" * 19 + b"\xff") * 100)
    assert not_text(str(tmp_path / "a.txt")) == "100 of its 2,000 bytes (5%) are not UTF-8"
    # Multi-byte characters cut by the read chunks still count as valid.
    (tmp_path / "b.txt").write_text("€" * 400_000, encoding="utf-8")  # 1.2 MB > one chunk
    assert not_text(str(tmp_path / "b.txt")) is None


def test_json_is_checked_strictly(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    assert not_text(str(tmp_path / "a.jsonl"), strict=True) == (
        "1 of its 17 bytes (5.88%) are not UTF-8"
    )
    assert not_text(str(tmp_path / "a.jsonl")) is None
