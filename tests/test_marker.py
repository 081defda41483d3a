"""The commit marker as untrusted input: hundreds of malformed markers, on local disk and
on ``memory://``; each one is a damaged checkpoint, never a crash or a stray write.

Every case stores a good ``step_3`` and a ``step_9`` whose files are intact but whose
marker is replaced by the case's bytes. A case must leave ``step_9`` "damaged, skipped":
named by :meth:`CheckpointStore.scan`, never picked by ``latest``, invisible to
retention, refused by ``fetch`` with a :class:`CheckpointCorruptError`, set aside by
``quarantine``, never promoted by ``recover``; and nothing is written outside the
download cache. About 30 representative cases run everywhere; the rest are marked
``full_grid``.
"""

from __future__ import annotations

import json
import os
import random
import uuid

import pytest

from accel_hydra.marker import MARKER_MAX_BYTES, MarkerError, parse_marker
from accel_hydra.retention import checkpoints_to_prune
from accel_hydra.storage import (
    MARKER,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointStore,
)

FILES = {"model.safetensors": b"weights " * 100, "optimizer.bin": b"moments " * 50}


def _base_record(tmp_path) -> dict:
    store = CheckpointStore(str(tmp_path / "base"))
    _commit(store, "step_9", 9)
    return json.loads((tmp_path / "base" / "step_9" / MARKER).read_bytes())


def _commit(store: CheckpointStore, name: str, step: int) -> None:
    staged = store.staging_dir(name)
    os.makedirs(staged, exist_ok=True)
    for rel, data in FILES.items():
        with open(os.path.join(staged, rel), "wb") as f:
            f.write(data)
    store.commit(name, staged, {"step": step, "epoch": 0, "batches_in_epoch": 1})


def _cases() -> list[tuple[str, object, bool]]:
    """(label, marker as bytes or as a function of the good record, must it be damaged)."""
    cases: list[tuple[str, object, bool]] = []

    def bad(label, make):
        cases.append((label, make, True))

    good_hash = "0123456789abcdef" * 2
    for label, raw in [
        ("empty file", b""),
        ("{}", b"{}"),
        ("a list", b"[]"),
        ("null", b"null"),
        ("a number", b"7"),
        ("a string", b'"step_9"'),
        ("NUL bytes", b"\x00" * 415),
        ("invalid UTF-8", b'{"step": 9, "\xff\xfe": 1}'),
        ("UTF-16", json.dumps({"step": 9}).encode("utf-16")),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
        ("huge integer text", b'{"step": ' + b"9" * 5000 + b"}"),
        ("too large", b" " * (MARKER_MAX_BYTES + 1)),
    ]:
        bad(label, raw)

    def edit(change):
        def make(record):
            record = json.loads(json.dumps(record))
            change(record)
            return json.dumps(record).encode()

        return make

    def raw_edit(old, new):
        return lambda record: json.dumps(record, sort_keys=True).encode().replace(old, new, 1)

    bad("cut in half", lambda r: json.dumps(r).encode()[: len(json.dumps(r)) // 2])
    bad("NaN step", raw_edit(b'"step": 9', b'"step": NaN'))
    bad("Infinity epoch", raw_edit(b'"epoch": 0', b'"epoch": Infinity'))
    bad("duplicate step", raw_edit(b'"step": 9', b'"step": 9, "step": 10'))
    bad("latin-1 key", raw_edit(b'"step"', b'"st\xe9p"'))
    bad("UTF-8 BOM", lambda r: b"\xef\xbb\xbf" + json.dumps(r).encode())

    wrong = [None, "abc", "9", -1, 2**50 + 1, 2**64, 10**30, 1.5, 9.0, True, False, [], [9], {}]
    for key in ("step", "epoch", "batches_in_epoch"):
        for value in wrong:
            bad(f"{key}={value!r}", edit(lambda r, k=key, v=value: r.__setitem__(k, v)))
    for key in ("step", "epoch", "checksum", "files"):
        bad(f"no {key}", edit(lambda r, k=key: r.pop(k)))
    for value in ("sha256", "crc32", "", None, 1, ["xxh3_128"]):
        bad(f"checksum={value!r}", edit(lambda r, v=value: r.__setitem__("checksum", v)))
    for value in (None, "model.safetensors", [], ["model.safetensors"], {}, 7, True):
        bad(f"files={value!r}", edit(lambda r, v=value: r.__setitem__("files", v)))
    for value in ([1], {"a": 1}, "x" * 2000, 2**70):
        bad(f"extra field={str(value)[:20]!r}", edit(lambda r, v=value: r.__setitem__("note", v)))

    names = [
        "../x.pth",
        "../../../../../../x.pth",
        "step_3/../../x.pth",
        "a/../../x.pth",
        "/etc/x.pth",
        "/tmp/x.pth",
        "/",
        "..",
        ".",
        "",
        "a//b",
        "a/",
        "./model.safetensors",
        "a/./b",
        "a\\b",
        "..\\..\\x.pth",
        "C:x.pth",
        "x\x00y",
        "\n",
        "mödel.bin",
        "a b",
        "~/x",
        "$HOME",
        "*",
        "%2e%2e/x",
        "x" * 256,
        "/".join(["d"] * 9) + "/f",
        MARKER,
    ]
    for name in names:
        for how in ("added", "renamed"):

            def change(r, n=name, h=how):
                records = r["files"]
                record = (
                    records.pop("model.safetensors")
                    if h == "renamed"
                    else {**records[next(iter(records))]}
                )
                records[n] = record

            bad(f"file {name[:40]!r} {how}", edit(change))
    bad(
        "file and directory",
        edit(
            lambda r: r["files"].update(
                {"x": r["files"]["optimizer.bin"], "x/y": r["files"]["optimizer.bin"]}
            )
        ),
    )

    records = [None, 1, "x", [], {}, {"size": 800}, {"hash": good_hash}]
    records += [{"size": 800, "hash": good_hash, "mode": 420}]
    records += [{"size": value, "hash": good_hash} for value in wrong]
    hashes = ["", "0" * 31, "0" * 33, "g" * 32, good_hash.upper(), 123, None, [good_hash]]
    records += [{"size": 800, "hash": value} for value in hashes]
    for i, record in enumerate(records):
        label = f"record #{i} {str(record)[:50]}"
        bad(label, edit(lambda r, v=record: r["files"].__setitem__("model.safetensors", v)))
    # Well-formed but wrong: caught by the check of the files, not of the marker.
    bad("size off by one", edit(lambda r: r["files"]["optimizer.bin"].update(size=401)))
    bad("hash of another file", edit(lambda r: r["files"]["optimizer.bin"].update(hash=good_hash)))
    bad(
        "a file that is not there",
        edit(lambda r: r["files"].update(extra={**r["files"]["optimizer.bin"]})),
    )

    # Random byte edits of a good marker: many still parse (a changed step is a valid
    # marker), so these only must never crash, stray, or load damaged bytes.
    rng = random.Random(10)
    for i in range(150):
        op = rng.choice(["flip", "delete", "insert", "truncate"])

        def mutate(record, op=op, seed=i):
            data = bytearray(json.dumps(record, sort_keys=True).encode())
            r = random.Random(seed)
            at = r.randrange(len(data))
            if op == "flip":
                data[at] ^= 1 << r.randrange(8)
            elif op == "delete":
                del data[at]
            elif op == "insert":
                data.insert(at, r.randrange(256))
            else:
                del data[at:]
            return bytes(data)

        cases.append((f"random {op} #{i}", mutate, False))
    return cases


CASES = _cases()
# The reproducers and one of each kind of mutation; the rest under full_grid.
REPRESENTATIVE = {
    "empty file", "{}", "a list", "invalid UTF-8", "deep nesting", "huge integer text",
    "too large", "NaN step", "duplicate step", "cut in half", "step='abc'", "step=-1",
    f"step={10**30!r}", "epoch=True", "epoch=1.5", "no files", "checksum='sha256'", "files=[]",
    "files={}", "file '../x.pth' added", "file '../../../../../../x.pth' renamed",
    "file '/etc/x.pth' renamed", "file 'a\\\\b' added", "file 'C:x.pth' added",
    "file '' added", "file and directory", "size off by one", "hash of another file",
    "a file that is not there", "random flip #0", "random truncate #3",
}  # fmt: skip


def _params(damaged_only=False):
    labels = [label for label, _, _ in CASES]
    assert len(labels) == len(set(labels)), "case labels must be unique"
    return [
        pytest.param(
            make,
            damaged,
            id=label,
            marks=() if label in REPRESENTATIVE else pytest.mark.full_grid,
        )
        for label, make, damaged in CASES
        if damaged or not damaged_only
    ]


def test_the_fuzzing_grid_is_a_few_hundred_cases_with_a_representative_slice():
    assert len(CASES) >= 300
    unmarked = [p for p in _params() if not p.marks]
    assert 25 <= len(unmarked) <= 40


def _tree(root) -> dict[str, bytes]:
    found = {}
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("make, must_be_damaged", _params())
def test_malformed_marker_is_damaged_and_skipped(tmp_path, where, make, must_be_damaged):
    raw = make(_base_record(tmp_path)) if callable(make) else make
    if where == "local":
        url = str(tmp_path / "run" / "checkpoints")
    else:
        url = f"memory://fuzz-{uuid.uuid4().hex}/run/checkpoints"
    store = CheckpointStore(url)
    _commit(store, "step_3", 3)
    _commit(store, "step_9", 9)
    store.fs.pipe_file(f"{store.path('step_9')}/{MARKER}", raw)
    # A real file where a traversing name would lead, so an unchecked fetch finds it.
    store.fs.pipe_file(f"{store.root}/x.pth", FILES["model.safetensors"])
    work = tmp_path / "work"
    cache = work / "cache"
    os.makedirs(work / "elsewhere")
    before = _tree(work)

    committed, damaged = store.scan()
    assert "step_3" in committed
    if must_be_damaged and "step_9" in committed:
        # Only a marker whose records do not match the files gets this far.
        with pytest.raises(CheckpointCorruptError, match="step_9 is damaged") as err:
            store.fetch("step_9", cache_dir=str(cache))
        assert err.value.damaged
    elif must_be_damaged:
        assert "step_9" in damaged and "is damaged" in damaged["step_9"]
        assert store.latest() == "step_3"
    checkpoints_to_prune(committed, keep_last_k=1, newest="step_3")
    try:
        local = store.fetch("step_9", cache_dir=str(cache))
    except CheckpointCorruptError as err:
        assert err.damaged and "step_9" in str(err)
    except CheckpointNotFoundError:
        assert not must_be_damaged  # a random edit can rename the marker's keys away
    else:
        assert not must_be_damaged
        fetched_files = {rel: data for rel, data in _tree(local).items() if rel != MARKER}
        assert fetched_files == FILES  # loaded only when every byte is as recorded
    after = _tree(work)
    fetched = os.path.join("cache", "accel_hydra_fetch")
    stray = {p for p in after if not p.startswith(fetched) and before.get(p) != after[p]}
    assert not stray, f"written outside the download cache: {stray}"
    for path in after:
        if path.startswith(fetched):
            assert path.split(os.sep)[3] == "step_9", f"outside the checkpoint's folder: {path}"

    if "step_9" in damaged:
        hidden = store.quarantine("step_9")
        assert "step_9" not in store.committed() and store.latest() == "step_3"
        if where == "local":
            assert hidden == ".corrupt-step_9"
            assert (tmp_path / "run" / "checkpoints" / hidden / MARKER).read_bytes() == raw


@pytest.mark.parametrize("make, must_be_damaged", _params(damaged_only=True))
def test_recover_never_promotes_a_stage_with_a_malformed_marker(tmp_path, make, must_be_damaged):
    raw = make(_base_record(tmp_path)) if callable(make) else make
    store = CheckpointStore(str(tmp_path / "run"))
    _commit(store, "best", 3)
    staged = store.staging_dir("best")
    os.makedirs(staged)
    for rel, data in FILES.items():
        (tmp_path / "run" / ".staging-best" / rel).write_bytes(data)
    (tmp_path / "run" / ".staging-best" / MARKER).write_bytes(raw)
    store.recover()
    assert sorted(os.listdir(tmp_path / "run")) == ["best"]
    assert store.read_marker("best")["step"] == 3
    store.verify("best")


def test_parse_marker_names_the_problem():
    with pytest.raises(MarkerError, match="not valid UTF-8 JSON"):
        parse_marker(b"\xff")
    with pytest.raises(MarkerError, match="the marker is a JSON list"):
        parse_marker(b"[]")
    with pytest.raises(MarkerError, match="step is 'abc', not an integer"):
        parse_marker(b'{"step": "abc", "epoch": 0}')
    with pytest.raises(MarkerError, match="'../x.pth' is not a plain relative name"):
        parse_marker(
            json.dumps(
                {
                    "step": 1,
                    "epoch": 0,
                    "checksum": "xxh3_128",
                    "files": {"../x.pth": {"size": 1, "hash": "0" * 32}},
                }
            ).encode()
        )
