"""checksum_file / checksum_files: the size and XXH3-128 of every byte, whatever the size."""

import os

import pytest
import xxhash

from accel_hydra import checksums
from accel_hydra.checksums import checksum_file, checksum_files

CHUNK = checksums._CHUNK


@pytest.mark.parametrize("size", [0, 1, 3000, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7])
def test_the_checksum_covers_every_byte_of_any_size(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    assert checksum_file(str(path)) == (size, xxhash.xxh3_128(data).hexdigest())


def test_many_files_on_threads_match_one_at_a_time(tmp_path, monkeypatch):
    paths = {}
    for i, size in enumerate((10, CHUNK + 3, 5000)):
        paths[f"f{i}"] = str(tmp_path / f"f{i}")
        (tmp_path / f"f{i}").write_bytes(os.urandom(size))
    one_by_one = checksum_files(paths, max_threads=1)
    monkeypatch.setattr(checksums, "_THREADS_FROM", 0)  # use the thread pool
    assert checksum_files(paths) == one_by_one
    assert one_by_one["f1"]["size"] == CHUNK + 3
