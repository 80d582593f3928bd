"""Streaming digests and atomic writes (secure_ml.integrity).

Touches: real files and directories under tmp_path, hashlib as the reference, a writer that
raises midway, an existing file that must survive, symlinks that must be refused.
Does not touch: SIGKILL mid-write (tests/test_cli.py kills the real CLI mid-stream).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from secure_ml.errors import BadInput
from secure_ml.integrity import atomic_write, atomic_write_bytes, list_tree, sha256_bytes, sha256_file, sha256_tree, tree_digest


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    for size in (0, 1, 65536, (1 << 20) + 3):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest() == sha256_bytes(data)


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.bin": os.urandom(3000), "sub/b.json": b"{}", "sub/deeper/c.txt": b"c" * 100_000, "empty": b""}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_sha256_tree_hashes_every_file_in_parallel(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert list_tree(tmp_path) == sorted(files)
    assert sha256_tree(tmp_path) == expected
    assert sha256_tree(tmp_path, workers=1) == expected


def test_tree_digest_is_order_independent_and_path_bound(tmp_path: Path) -> None:
    digests = sha256_tree(tmp_path) if make_tree(tmp_path) else {}
    assert tree_digest(digests) == tree_digest(dict(reversed(list(digests.items()))))
    renamed = {("z.bin" if k == "a.bin" else k): v for k, v in digests.items()}
    assert tree_digest(renamed) != tree_digest(digests)
    swapped = dict(digests)
    swapped["a.bin"], swapped["empty"] = digests["empty"], digests["a.bin"]
    assert tree_digest(swapped) != tree_digest(digests)


def test_trees_with_symlinks_or_that_are_not_directories_are_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    (tmp_path / "secret").write_text("outside")
    (tmp_path / "t" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(BadInput, match="symbolic link in .*: link"):
        sha256_tree(tmp_path / "t")
    (tmp_path / "t" / "link").unlink()
    (tmp_path / "t" / "sub" / "dirlink").symlink_to(tmp_path)
    with pytest.raises(BadInput, match="symbolic link"):
        list_tree(tmp_path / "t")
    with pytest.raises(BadInput, match="not a directory"):
        sha256_tree(tmp_path / "secret")


def test_atomic_write_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first" and oct(target.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_write(target) as handle:
            handle.write(b"partial " * 100_000)
            raise RuntimeError("midway")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temp file left
    with atomic_write(target, mode=0o640) as handle:
        handle.write(b"second")
    assert target.read_bytes() == b"second" and oct(target.stat().st_mode & 0o777) == "0o640"


def test_atomic_write_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "out.bin"
    with atomic_write(target, overwrite=False) as handle:
        handle.write(b"one")
    with pytest.raises(BadInput, match="output exists"):
        with atomic_write(target, overwrite=False) as handle:
            handle.write(b"two")
    # the file appears while we write: still never clobbered
    other = tmp_path / "race.bin"
    with pytest.raises(BadInput, match="output exists"):
        with atomic_write(other, overwrite=False) as handle:
            handle.write(b"mine")
            other.write_bytes(b"theirs")
    assert target.read_bytes() == b"one" and other.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "race.bin"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_large_atomic_writes_release_pages_as_they_go_and_stay_exact(tmp_path: Path) -> None:
    """Past RELEASE_EVERY bytes the writer syncs and drops what it wrote from the page cache;
    the bytes on disk are still exactly what was written, in order."""
    from secure_ml import integrity

    digest = hashlib.sha256()
    target = tmp_path / "big.bin"
    with atomic_write(target) as handle:
        for i in range(2 * integrity.RELEASE_EVERY // (1 << 20) + 3):
            piece = os.urandom((1 << 20) + i)  # odd sizes: releases fall mid-piece
            digest.update(piece)
            handle.write(piece)
            handle.write(b"|")
            digest.update(b"|")
        assert handle.raw._released >= 2 * integrity.RELEASE_EVERY  # type: ignore[attr-defined]
    assert sha256_file(target) == digest.hexdigest()


def test_direct_io_writer_keeps_exact_bytes_across_stages_flushes_and_seeks(tmp_path: Path) -> None:
    """The O_DIRECT stage: odd-sized writes spanning several stages, tell() counting staged
    bytes, a mid-stream flush (tail written, direct I/O left), more writes, a seek back and an
    overwrite; the file ends byte-exact. Where the file system refuses O_DIRECT the same
    sequence runs through the buffered fallback."""
    from secure_ml import integrity

    target = tmp_path / "direct.bin"
    expected = bytearray()
    with atomic_write(target) as handle:
        for i in range(2 * integrity.STAGE_SIZE // (1 << 20) + 2):
            piece = os.urandom((1 << 20) + 16 + i)
            assert handle.write(memoryview(piece)) == len(piece)
            expected += piece
            assert handle.tell() == len(expected)
        handle.flush()
        assert os.fstat(handle.fileno()).st_size == len(expected)  # flush hands everything over
        tail = os.urandom(12345)
        handle.write(tail)
        expected += tail
        handle.seek(10)
        handle.write(b"XYZ")
        expected[10:13] = b"XYZ"
    assert target.read_bytes() == bytes(expected)
