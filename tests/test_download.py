"""The download stage against a real HTTP server on 127.0.0.1 that injects faults.

Every test ends by checking what is on disk: exactly the valid files under their
final names, nothing partial, and the right error where recovery is impossible.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import sys
import threading
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import nanoforge.data.download as download
import nanoforge.data.fetch as fetch
from nanoforge.config import load_params
from nanoforge.data.eval_bundle import BundleError, check_bundle, unpack_bundle
from nanoforge.data.shards import read_manifest, shard_stats
from stages.download import main
from tests.conftest import REPO, make_project, run, tool
from tests.datagen import lie_in_central_directory, make_eval_bundle, make_fineweb, make_zip_bomb, write_shard
from tests.mirror_server import MirrorServer

SHARDS = ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
SHARED = REPO.parent / "shared" / "data"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def zip_folder(folder: Path, archive: Path, top: str | None = "eval_bundle") -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                rel = path.relative_to(folder)
                zf.write(path, str(Path(top) / rel) if top else str(rel))
    return archive


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """Shards 0, 1, 2 and 1822 plus eval_bundle.zip (with its top-level folder), like the real hosts."""
    root = tmp_path_factory.mktemp("mirror")
    make_fineweb(root, train=(0, 1, 2), val=1822, docs_per_shard=200, row_group_size=64, manifest=False)
    bundle = make_eval_bundle(tmp_path_factory.mktemp("bundle") / "eval_bundle")
    zip_folder(bundle, root / "eval_bundle.zip")
    return root


@pytest.fixture
def server(mirror):
    with MirrorServer(mirror) as srv:
        yield srv


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A repo-root-like cwd (params.yaml, no DVC), tracking off, backoff tiny."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(work)
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(fetch, "BACKOFF_BASE_S", 0.01)
    return work


@pytest.fixture
def logs():
    """Records of the download logger (it writes to the real stderr, not through root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("nanoforge.download")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def stage(*args: str) -> int:
    return main(list(args))


def assert_clean(data: Path = Path("data")) -> None:
    """No partial or temporary file anywhere under data/."""
    leftovers = [p for p in data.rglob("*") if p.name.endswith((".part", ".lock", ".tmp")) or p.name.startswith(".")]
    assert not leftovers, leftovers


def assert_complete(mirror: Path, shards=SHARDS) -> None:
    for name in shards:
        assert sha256(Path("data/fineweb") / name) == sha256(mirror / name), name
    check_bundle("data/eval_bundle")
    assert_clean()


# ---------------------------------------------------------------------------
# the happy path, re-runs, and what lands on disk

def test_download_from_mirror_url(workdir, server, mirror, monkeypatch, capsys, logs):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert stage() == 0
    out = capsys.readouterr().out
    assert f"shards from {server.url}  (NANOFORGE_MIRROR)" in out
    assert f"eval bundle from {server.url}/eval_bundle.zip  (NANOFORGE_MIRROR)" in out
    assert_complete(mirror)
    assert sorted(p.name for p in Path("data/fineweb").iterdir()) == ["MANIFEST.json", *SHARDS]
    # the zip's top-level eval_bundle/ folder is stripped: data/eval_bundle/core.yaml, not .../eval_bundle/eval_bundle
    assert sorted(p.name for p in Path("data/eval_bundle").iterdir()) == ["core.yaml", "eval_data", "eval_meta_data.csv"]
    manifest = read_manifest("data/fineweb/MANIFEST.json")
    assert manifest["train_shards"] == [0, 1] and manifest["val_shard"] == 1822
    for entry in manifest["shards"]:
        path = mirror / entry["file"]
        stats = shard_stats(path)
        assert entry["bytes"] == path.stat().st_size and entry["sha256"] == sha256(path)
        assert (entry["rows"], entry["chars"]) == (stats["rows"], stats["chars"])
        assert entry["split"] == ("val" if entry["index"] == 1822 else "train")
    assert manifest["totals"]["train"]["shards"] == 2 and manifest["totals"]["val"]["rows"] == 200
    # outside a DVC repo: a warning, not a failure
    assert any("not inside a DVC repo" in r.getMessage() for r in logs)


def test_rerun_downloads_nothing_and_keeps_the_manifest(workdir, server, monkeypatch):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert stage() == 0
    manifest = Path("data/fineweb/MANIFEST.json")
    before, mtime = manifest.read_bytes(), manifest.stat().st_mtime_ns
    gets = len(server.gets())
    assert stage() == 0
    assert len(server.gets()) == gets  # not one byte fetched again
    assert manifest.read_bytes() == before and manifest.stat().st_mtime_ns == mtime


def test_identical_bytes_from_another_source_change_nothing(workdir, server, mirror, monkeypatch):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert stage() == 0
    before = Path("data/fineweb/MANIFEST.json").read_bytes()
    monkeypatch.setenv("NANOFORGE_MIRROR", str(mirror))  # a folder mirror with the same bytes
    assert stage() == 0
    assert Path("data/fineweb/MANIFEST.json").read_bytes() == before


# ---------------------------------------------------------------------------
# faults the downloader recovers from

def test_recovers_from_drops_5xx_429_and_truncation(workdir, server, mirror, monkeypatch, logs):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    server.inject("shard_00000.parquet", "drop")
    server.inject("shard_00001.parquet", "500", "503")
    server.inject("shard_01822.parquet", "429:1")
    server.inject("eval_bundle.zip", "truncate", "drop")
    start = time.monotonic()
    assert stage() == 0
    assert time.monotonic() - start >= 1.0  # Retry-After: 1 was honoured (the backoff itself is ~10 ms)
    assert_complete(mirror)
    # the dropped shard was resumed where it broke off, not fetched again from zero
    gets = server.gets("shard_00000.parquet")
    assert [g["fault"] for g in gets] == ["drop", None]
    assert gets[1]["range"] and gets[1]["range"].startswith("bytes=") and gets[1]["status"] == 206
    assert [g["status"] for g in server.gets("shard_00001.parquet")] == [500, 503, 200]
    assert [g["status"] for g in server.gets("shard_01822.parquet")] == [429, 200]
    # a truncated body that *looked* complete failed verification and was fetched again
    assert [g["fault"] for g in server.gets("eval_bundle.zip")][:2] == ["truncate", "drop"]
    messages = " ".join(r.getMessage() for r in logs)
    assert "HTTP 429" in messages and "HTTP 503" in messages and "failed verification" in messages


def test_resumes_a_partial_file_with_range(workdir, server, mirror, monkeypatch):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    src = (mirror / "shard_00001.parquet").read_bytes()
    part = Path("data/fineweb/shard_00001.parquet.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(src[: len(src) // 3])
    assert stage() == 0
    gets = server.gets("shard_00001.parquet")
    assert len(gets) == 1 and gets[0]["range"] == f"bytes={len(src) // 3}-" and gets[0]["status"] == 206
    assert_complete(mirror)


def test_a_complete_part_file_just_gets_verified(workdir, server, mirror, monkeypatch):
    # an earlier run got every byte but died before the rename: the server answers 416
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    Path("data/fineweb").mkdir(parents=True)
    (Path("data/fineweb") / "shard_00000.parquet.part").write_bytes((mirror / "shard_00000.parquet").read_bytes())
    assert stage() == 0
    assert [g["status"] for g in server.gets("shard_00000.parquet")] == [416]
    assert_complete(mirror)


def test_server_without_range_support_restarts_cleanly(workdir, mirror, monkeypatch):
    with MirrorServer(mirror, ranges=False) as srv:
        monkeypatch.setenv("NANOFORGE_MIRROR", srv.url)
        src = (mirror / "shard_00000.parquet").read_bytes()
        Path("data/fineweb").mkdir(parents=True)
        (Path("data/fineweb") / "shard_00000.parquet.part").write_bytes(src[:1000])
        srv.inject("shard_00001.parquet", "drop")
        assert stage() == 0
        assert [g["status"] for g in srv.gets("shard_00000.parquet")] == [200]
        assert [g["status"] for g in srv.gets("shard_00001.parquet")] == [200, 200]
    assert_complete(mirror)


def test_a_stalled_read_times_out_and_retries(workdir, server, mirror, monkeypatch):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    server.inject("shard_00000.parquet", "stall:3")
    assert stage("--set", "timeout_s=0.3") == 0
    assert len(server.gets("shard_00000.parquet")) == 2
    assert_complete(mirror)


def test_invalid_shards_on_disk_are_replaced(workdir, server, mirror, monkeypatch):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert stage() == 0
    # one shard garbled, one replaced by another *valid* shard: the manifest's sha256 catches that
    Path("data/fineweb/shard_00000.parquet").write_bytes(b"PAR1 garbage")
    Path("data/fineweb/shard_00001.parquet").write_bytes((mirror / "shard_00002.parquet").read_bytes())
    gets = len(server.gets())
    assert stage() == 0
    assert {g["name"] for g in server.gets()[gets:]} == {"shard_00000.parquet", "shard_00001.parquet"}
    assert_complete(mirror)
    # without a manifest, a garbled shard fails shard validation and is replaced too
    Path("data/fineweb/MANIFEST.json").unlink()
    Path("data/fineweb/shard_01822.parquet").write_bytes(b"not parquet")
    assert stage() == 0
    assert_complete(mirror)


# ---------------------------------------------------------------------------
# faults it cannot recover from: the right error, and nothing bad on disk

def test_corrupt_shard_at_the_source(workdir, server, mirror, monkeypatch, capsys):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    server.inject("shard_00001.parquet", "corrupt*")
    assert stage() == 1
    err = capsys.readouterr().err
    assert f"{server.url}/shard_00001.parquet: the file is invalid even when fetched again" in err
    assert len(server.gets("shard_00001.parquet")) == 2  # one fresh retry, then it blames the source
    assert not Path("data/fineweb/shard_00001.parquet").exists()
    for name in ("shard_00000.parquet", "shard_01822.parquet"):  # the good ones are kept
        assert sha256(Path("data/fineweb") / name) == sha256(mirror / name)
    assert not Path("data/fineweb/MANIFEST.json").exists()
    assert_clean()


def test_missing_shard_is_a_404_before_any_download(workdir, server, monkeypatch, capsys):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert stage("--set", "num_train_shards=4") == 1  # the mirror has shards 0..2
    err = capsys.readouterr().err
    assert f"{server.url}/shard_00003.parquet: HTTP 404 Not Found" in err
    assert server.gets() == []  # HEADs found it out; not one shard was downloaded
    assert not Path("data/fineweb/shard_00000.parquet").exists()


def test_404_on_get_is_not_retried(workdir, server, monkeypatch, capsys):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    server.inject("shard_00001.parquet", "404*")
    assert stage() == 1
    assert f"{server.url}/shard_00001.parquet: HTTP 404" in capsys.readouterr().err
    assert len(server.gets("shard_00001.parquet")) == 1
    assert_clean()


def test_persistent_500_gives_up_after_max_retries(workdir, server, monkeypatch, capsys):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    server.inject("shard_00000.parquet", "500*")
    assert stage("--set", "max_retries=2") == 1
    assert "giving up after 3 attempts (last: HTTP 500" in capsys.readouterr().err
    assert len(server.gets("shard_00000.parquet")) == 3
    assert not Path("data/fineweb/shard_00000.parquet").exists()


def test_wrong_bundle_url_fails_before_the_shards(workdir, server, monkeypatch, capsys):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert stage("--set", f"eval_bundle_url={server.url}/nope.zip") == 1
    assert f"eval bundle: {server.url}/nope.zip: HTTP 404" in capsys.readouterr().err
    assert server.gets() == []


def test_disk_full_before_downloading(workdir, server, monkeypatch, capsys):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    monkeypatch.setattr(download, "free_bytes", lambda path: 1000)
    assert stage() == 1
    assert "disk full: the 3 shards to fetch need" in capsys.readouterr().err
    assert server.gets() == []


def test_disk_full_while_writing(tmp_path, server, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(fetch, "open", lambda p, mode="r": Full(real_open(p, mode)), raising=False)
    dest = tmp_path / "shard_00000.parquet"
    with pytest.raises(fetch.DiskFullError, match=r"disk full writing .*shard_00000\.parquet\.part"):
        fetch.fetch(f"{server.url}/shard_00000.parquet", dest, max_retries=3)
    assert not dest.exists() and len(server.gets()) == 1  # no retries: a full disk stays full


# ---------------------------------------------------------------------------
# the eval bundle: unsafe zips are refused before anything is written

def _evil_zip(path: Path, bundle: Path, name: str, symlink: bool = False) -> Path:
    zip_folder(bundle, path)
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo(name)
        if symlink:
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(info, "pwned")
    return path


@pytest.mark.parametrize("name,symlink,reason", [
    ("eval_bundle/../../escaped.txt", False, "zip-slip"),
    ("eval_bundle/eval_data/..\\..\\escaped.txt", False, "zip-slip"),
    ("/tmp/escaped.txt", False, "absolute path"),
    ("eval_bundle/eval_data/link", True, "symbolic link"),
])
def test_unsafe_zip_entries_are_refused(tmp_path, name, symlink, reason):
    bundle = make_eval_bundle(tmp_path / "src")
    archive = _evil_zip(tmp_path / "evil.zip", bundle, name, symlink)
    dest = tmp_path / "out" / "data" / "eval_bundle"
    with pytest.raises(BundleError, match=reason):
        unpack_bundle(archive, dest)
    assert not dest.exists() and not (tmp_path / "out" / "escaped.txt").exists()
    assert not list((tmp_path / "out").rglob("*"))  # nothing written at all, not even a temp folder


def test_zip_slip_over_http_leaves_no_bundle(workdir, tmp_path, server, monkeypatch, capsys):
    archive = _evil_zip(tmp_path / "evil" / "eval_bundle.zip", make_eval_bundle(tmp_path / "b"), "eval_bundle/../x")
    with MirrorServer(archive.parent) as evil:
        monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
        assert stage("--set", f"eval_bundle_url={evil.url}/eval_bundle.zip") == 1
    assert "refusing entry 'eval_bundle/../x'" in capsys.readouterr().err
    assert not Path("data/eval_bundle").exists() and not Path("data/x").exists()
    assert not Path("data/fineweb/MANIFEST.json").exists()
    assert_clean()


BOMB = "eval_bundle/eval_data/bomb.jsonl"


def test_a_zip_bomb_is_refused_before_anything_is_written(workdir, tmp_path, server, monkeypatch, capsys):
    """1.06 MB on disk, 1.09 GB unpacked (1,029:1): the probe that used to fill data/eval_bundle."""
    bomb = make_zip_bomb(tmp_path / "evil" / "eval_bundle.zip", make_eval_bundle(tmp_path / "b"), 1_090_000_000)
    assert bomb.stat().st_size < 2_000_000
    with MirrorServer(bomb.parent) as evil:
        monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
        assert stage("--set", f"eval_bundle_url={evil.url}/eval_bundle.zip") == 1
    err = capsys.readouterr().err
    assert f"refusing entry '{BOMB}': a zip bomb (1,090.0 MB from 1,05" in err and "over the limit of 200:1" in err
    assert "NANOFORGE_BUNDLE_MAX_RATIO" in err  # how to raise it, for a trusted archive
    assert not Path("data/eval_bundle").exists() and not Path("data/fineweb/MANIFEST.json").exists()
    assert_clean()  # no temporary folder, no downloaded archive left behind


def test_lying_zip_headers_are_caught_while_writing(tmp_path):
    """Headers can lie: sizes are counted as bytes are written, against what the file really holds."""
    bundle = make_eval_bundle(tmp_path / "b")
    out = tmp_path / "out"
    # a compress_size claiming 32 MB makes 64 MB of zeros look like 2:1; the entry really spans 65 KB of the file
    hidden = make_zip_bomb(tmp_path / "hidden.zip", bundle, 64 << 20, padding_bytes=1 << 20)
    lie_in_central_directory(hidden, BOMB, compress_size=32 << 20)
    with pytest.raises(BundleError, match=rf"refusing entry '{BOMB}': a zip bomb \(over 1\d\.\d MB from 6\d\.\d KB "
                                          r"in the file, over the limit of 200:1"):
        unpack_bundle(hidden, out / "eval_bundle")
    assert not list(out.rglob("*"))
    # a file_size claiming 1000 bytes: never more than that is written, and the CRC gives it away
    small = make_zip_bomb(tmp_path / "small.zip", bundle, 64 << 20, padding_bytes=1 << 20)
    lie_in_central_directory(small, BOMB, file_size=1000)
    with pytest.raises(BundleError, match=rf"entry '{BOMB}' is corrupt \(Bad CRC-32"):
        unpack_bundle(small, out / "eval_bundle")
    assert not list(out.rglob("*"))


def test_zip_limits_can_be_raised_for_a_trusted_archive(workdir, tmp_path, monkeypatch, capsys):
    bomb = make_zip_bomb(tmp_path / "bomb.zip", make_eval_bundle(tmp_path / "b"), 8 << 20)
    monkeypatch.setenv("NANOFORGE_BUNDLE_MAX_BYTES", "5e6")  # the total, named at the entry that crosses it
    with pytest.raises(BundleError, match=rf"refusing entry '{BOMB}': with it the zip unpacks to 8.4 MB, "
                                          r"over the limit of 5.0 MB"):
        unpack_bundle(bomb, tmp_path / "out" / "eval_bundle")
    monkeypatch.delenv("NANOFORGE_BUNDLE_MAX_BYTES")
    monkeypatch.setenv("NANOFORGE_BUNDLE_MAX_RATIO", "5000")
    assert unpack_bundle(bomb, tmp_path / "out" / "eval_bundle")["files"] == 6
    assert (tmp_path / "out" / "eval_bundle" / "eval_data" / "bomb.jsonl").stat().st_size == 8 << 20
    # a bad value is refused before any work, naming the variable
    monkeypatch.setenv("NANOFORGE_BUNDLE_MAX_RATIO", "lots")
    monkeypatch.setenv("NANOFORGE_MIRROR", str(tmp_path / "nowhere"))
    make_fineweb(tmp_path / "nowhere", train=(0, 1), val=1822, docs_per_shard=20, manifest=False)
    bomb.rename(tmp_path / "nowhere" / "eval_bundle.zip")
    assert stage() == 2
    assert "NANOFORGE_BUNDLE_MAX_RATIO='lots' is not a number" in capsys.readouterr().err
    assert not Path("data").exists()


def test_bundle_zip_layouts(tmp_path):
    bundle = make_eval_bundle(tmp_path / "src")
    flat = zip_folder(bundle, tmp_path / "flat.zip", top=None)  # no top-level folder
    info = unpack_bundle(flat, tmp_path / "a" / "eval_bundle")
    assert info["tasks"] == 3 and (tmp_path / "a" / "eval_bundle" / "core.yaml").exists()
    mac = zip_folder(bundle, tmp_path / "mac.zip")
    with zipfile.ZipFile(mac, "a") as zf:
        zf.writestr("__MACOSX/eval_bundle/._core.yaml", "junk")
    unpack_bundle(mac, tmp_path / "b" / "eval_bundle")
    assert not (tmp_path / "b" / "eval_bundle" / "__MACOSX").exists()
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="not a readable zip"):
        unpack_bundle(tmp_path / "junk.zip", tmp_path / "c" / "eval_bundle")
    empty = tmp_path / "nocore.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(BundleError, match="no core.yaml inside"):
        unpack_bundle(empty, tmp_path / "d" / "eval_bundle")
    # core.yaml naming a task file the zip lacks: incomplete, refused
    (bundle / "eval_data" / "toy" / "toy_lm.jsonl").unlink()
    with pytest.raises(BundleError, match="toy_lm: eval_data/toy/toy_lm.jsonl"):
        unpack_bundle(zip_folder(bundle, tmp_path / "partial.zip"), tmp_path / "e" / "eval_bundle")
    assert not (tmp_path / "e" / "eval_bundle").exists()


# ---------------------------------------------------------------------------
# sources: folders, the mirror variable, HF_ENDPOINT, precedence

def test_folder_sources_and_precedence(workdir, tmp_path, server, mirror, monkeypatch, capsys):
    folder = tmp_path / "folder_mirror"
    make_fineweb(folder, train=(0, 1), val=1822, docs_per_shard=50, manifest=False)
    make_eval_bundle(folder / "eval_bundle")  # unpacked, no zip: copied as is
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    # --set beats the environment: shards from the folder, the bundle still from the mirror URL
    assert stage("--set", f"source_dir={folder}") == 0
    out = capsys.readouterr().out
    assert f"shards from {folder}  (--set source_dir)" in out and "(NANOFORGE_MIRROR)" in out
    assert [g["name"] for g in server.gets()] == ["eval_bundle.zip"]
    for name in SHARDS[:1] + SHARDS[2:]:
        assert sha256(Path("data/fineweb") / name) == sha256(folder / name)
    # a folder mirror with an unpacked bundle
    import shutil

    shutil.rmtree("data")
    monkeypatch.setenv("NANOFORGE_MIRROR", str(folder))
    assert stage() == 0
    assert (Path("data/eval_bundle/core.yaml").read_bytes() == (folder / "eval_bundle" / "core.yaml").read_bytes())
    assert_clean()


def test_hf_endpoint_replaces_the_host(workdir, server, mirror, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert stage("--set", f"eval_bundle_url={mirror / 'eval_bundle.zip'}") == 0
    paths = {g["path"] for g in server.gets()}
    assert "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00000.parquet" in paths
    assert_complete(mirror)


def test_resolve_sources_rules(tmp_path):
    cfg = load_params(REPO / "params.yaml").download
    s = download.resolve_sources(cfg, env={})
    assert s.shard(7) == f"{cfg.shards_url}/shard_00007.parquet" and s.bundle == cfg.eval_bundle_url
    s = download.resolve_sources(cfg, env={"HF_ENDPOINT": "https://hf-mirror.com/"})
    assert s.shards.startswith("https://hf-mirror.com/datasets/karpathy/") and "HF_ENDPOINT" in s.shards_from
    s = download.resolve_sources(cfg, env={"NANOFORGE_MIRROR": "http://m:1/x/"})
    assert (s.shards, s.bundle) == ("http://m:1/x", "http://m:1/x/eval_bundle.zip")
    s = download.resolve_sources(cfg, {"base_url"}, env={"NANOFORGE_MIRROR": "http://m:1"})
    assert s.shards == cfg.shards_url and s.bundle == "http://m:1/eval_bundle.zip"
    s = download.resolve_sources(cfg, {"eval_bundle_url"}, env={"NANOFORGE_MIRROR": str(tmp_path)})
    assert s.shards == str(tmp_path) and s.bundle == cfg.eval_bundle_url


def test_source_folder_errors(workdir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert stage("--set", f"source_dir={empty}") == 2
    assert f"shard source folder {empty} holds no parquet files" in capsys.readouterr().err
    assert stage("--set", f"source_dir={tmp_path / 'nowhere'}") == 2
    assert "does not exist" in capsys.readouterr().err
    partial = tmp_path / "partial"
    make_fineweb(partial, train=(0,), val=1822, docs_per_shard=20, manifest=False)
    assert stage("--set", f"source_dir={partial}") == 2
    assert "lacks shard_00001.parquet (it has shard_00000.parquet, shard_01822.parquet)" in capsys.readouterr().err
    assert not Path("data").exists()  # all of that before any work


def test_shard_without_text_column(workdir, tmp_path, mirror, capsys):
    folder = tmp_path / "notext"
    make_fineweb(folder, train=(0, 1), val=1822, docs_per_shard=20, manifest=False)
    pq.write_table(pa.table({"content": ["a", "b"]}), folder / "shard_00001.parquet")
    assert stage("--set", f"source_dir={folder}", "--set", f"eval_bundle_url={mirror / 'eval_bundle.zip'}") == 1
    assert "has no 'text' column (columns: content)" in capsys.readouterr().err
    assert not Path("data/fineweb/shard_00001.parquet").exists()
    assert Path("data/fineweb/shard_00000.parquet").exists()
    assert_clean()


# ---------------------------------------------------------------------------
# subsets, config changes, concurrency, progress

def test_only_shards_then_a_full_run(workdir, server, mirror, monkeypatch):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert stage("--only-shards", "0,1822", "--no-dvc-add") == 0
    assert sorted(p.name for p in Path("data/fineweb").iterdir()) == [SHARDS[0], SHARDS[2]]
    assert not Path("data/eval_bundle").exists()  # no bundle, no manifest: a full run does those
    gets = len(server.gets())
    assert stage() == 0
    assert [g["name"] for g in server.gets()[gets:]] == ["shard_00001.parquet", "eval_bundle.zip"]
    assert_complete(mirror)
    # the Python API the orchestrator uses: partitions, then one finalize
    cfg = load_params("params.yaml").download
    report = download.download_shards([2], cfg, download.resolve_sources(cfg))
    assert report.downloaded == [2] and report.entries[2]["sha256"] == sha256(mirror / "shard_00002.parquet")


def test_fewer_shards_later(workdir, server, monkeypatch, logs):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert stage("--set", "num_train_shards=3") == 0
    assert read_manifest("data/fineweb/MANIFEST.json")["train_shards"] == [0, 1, 2]
    assert stage() == 0
    manifest = read_manifest("data/fineweb/MANIFEST.json")
    assert manifest["train_shards"] == [0, 1] and [e["index"] for e in manifest["shards"]] == [0, 1, 1822]
    assert Path("data/fineweb/shard_00002.parquet").exists()  # kept on disk, just not in the manifest
    assert any("not in this config" in r.getMessage() and "shard_00002" in r.getMessage() for r in logs)


def test_two_processes_never_fetch_the_same_shard_twice(workdir, server, monkeypatch):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    server.inject("shard_00000.parquet", "stall:0.5")  # hold the first one inside the lock a while
    cfg = load_params("params.yaml").download
    errors = []

    def partition():
        try:
            download.download_shards([0], cfg, download.resolve_sources(cfg))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=partition) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(server.gets("shard_00000.parquet")) == 1


def test_progress_lines_without_a_terminal(workdir, server, monkeypatch, logs):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    monkeypatch.setattr(fetch, "PROGRESS_EVERY_S", 0.0)
    assert stage() == 0
    lines = [r.getMessage() for r in logs if "MB/s" in r.getMessage() and "files" in r.getMessage()]
    assert lines and any("shards 3/3 files" in line for line in lines)
    assert any("ETA" in line for line in lines)


def test_progress_bar_on_a_terminal(capsys):
    progress = fetch.Progress("shards", 2, {"a": 1000, "b": None}, tty=True)
    progress.update("a", 0, 1000)
    progress.update("a", 500, 1000)
    progress.finished("a")
    assert progress.transferred == 500 and progress.bar.total == 2000  # b's size: assume the average
    progress.close()
    assert "shards 1/2" in capsys.readouterr().err


def test_backoff_and_retry_after():
    delays = [fetch.backoff_delay(i, base=1.0) for i in range(8)]
    assert 0.5 <= delays[0] <= 1.5 and 4 <= delays[3] <= 12 and max(delays) <= fetch.BACKOFF_CAP_S * 1.5
    assert fetch.retry_after_seconds("7") == 7 and fetch.retry_after_seconds("99999") == fetch.RETRY_AFTER_CAP_S
    assert fetch.retry_after_seconds("soon") is None and fetch.retry_after_seconds(None) is None
    from email.utils import formatdate

    assert 20 <= fetch.retry_after_seconds(formatdate(time.time() + 30, usegmt=True)) <= 31


# ---------------------------------------------------------------------------
# config: bad download params fail before any work

@pytest.mark.parametrize("override,message", [
    ("num_train_shards=1823", r"download\.num_train_shards=1823 is more than fineweb-edu has: 1823 shards"),
    ("val_shard=1900", r"download\.val_shard=1900 is outside fineweb-edu's shards 0\.\.1822"),
    ("val_shard=1", r"download\.val_shard=1 is also a training shard"),
    ("workers=0", r"download\.workers: input should be greater than or equal to 1"),
    ("timeout_s=-1", r"download\.timeout_s: input should be greater than 0"),
    ("max_retries=many", r"download\.max_retries: input should be a valid integer"),
    ("base_url=ftp://example.com/x", r"download\.base_url='ftp://example.com/x' is not an http\(s\) URL"),
    ("source_dir=''", r"download\.source_dir is empty"),
    ("num_shards=3", r"download\.num_shards: unknown key \(did you mean 'num_train_shards'\?\)"),
])
def test_bad_download_config(workdir, override, message, capsys):
    assert stage("--set", override) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not Path("data").exists()


@pytest.mark.parametrize("value,message", [
    ("1900", "outside the dataset's shards 0..1822"),
    ("0,x", "'x' is not a shard index"),
    ("5-2", "empty range"),
    (",", "no shard indices"),
])
def test_bad_only_shards(workdir, value, message, capsys):
    assert stage("--only-shards", value) == 2
    assert message in capsys.readouterr().err


def test_parse_indices():
    assert download.parse_indices("3,0-2,1822,2") == [0, 1, 2, 3, 1822]


# ---------------------------------------------------------------------------
# the real thing: a subprocess in a git+DVC project, MLflow, dvc add round trip

def test_dvc_add_round_trip_and_mlflow(tmp_path, server, monkeypatch):
    project = make_project(tmp_path / "project")
    # the real CLI in a subprocess, as `make demo` runs it, tracked in MLflow
    run([sys.executable, "-m", "stages.download"], project, env={"NANOFORGE_MIRROR": server.url}, timeout=120)
    data_dvc = project / "data.dvc"
    first = data_dvc.read_text()
    assert "md5:" in first and "path: data" in first
    assert "/data" in (project / ".gitignore").read_text()
    assert run([tool("dvc"), "status", "data.dvc"], project).stdout.strip().startswith("Data and pipelines are up to date")

    # the MLflow run: params incl. the sources in effect, totals, the manifest as an artifact
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    (r,) = client.search_runs([client.get_experiment_by_name("nanoforge").experiment_id])
    assert r.info.status == "FINISHED" and r.data.tags["stage"] == "download"
    assert r.data.params["shards_source"] == server.url and r.data.params["num_train_shards"] == "2"
    manifest = json.loads((project / "data/fineweb/MANIFEST.json").read_text())
    assert r.data.metrics["rows"] == sum(e["rows"] for e in manifest["shards"])
    assert r.data.metrics["shards"] == 3 and r.data.metrics["downloaded_shards"] == 3
    for key in ("chars", "bytes", "seconds", "mb_per_s"):
        assert key in r.data.metrics
    assert r.data.tags["data_dvc_changed"] == "True"
    assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["MANIFEST.json"]

    # the rest in-process (same code path, no interpreter start-up): dvc add is still the real one
    monkeypatch.chdir(project)
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert stage() == 0  # same data: data.dvc byte-identical
    assert data_dvc.read_text() == first
    assert stage("--set", "num_train_shards=3") == 0  # more data: data.dvc changes
    second = data_dvc.read_text()
    assert second != first
    (project / "data/fineweb/shard_00002.parquet").unlink()
    assert stage("--set", "num_train_shards=3", "--no-dvc-add") == 0  # data changed, data.dvc left alone
    assert data_dvc.read_text() == second


@pytest.mark.skipif(not (SHARED / "fineweb_sample").is_dir() or not (SHARED / "eval_bundle").is_dir(),
                    reason="needs ../shared/data (real sample shards and eval bundle); a user's clone has none")
def test_real_formats_from_a_local_mirror(workdir, tmp_path, monkeypatch):
    from bench.mirror import build_mirror

    folder = build_mirror(tmp_path / "real_mirror")
    with MirrorServer(folder) as srv:
        monkeypatch.setenv("NANOFORGE_MIRROR", srv.url)
        assert stage() == 0
    manifest = read_manifest("data/fineweb/MANIFEST.json")
    assert [(e["index"], e["rows"], e["chars"]) for e in manifest["shards"]] == [
        (0, 168, 490_321), (1, 168, 486_885), (1822, 168, 408_924)]  # PROVENANCE.md's numbers
    info = check_bundle("data/eval_bundle")
    assert info["tasks"] == 20 and Path("data/eval_bundle/eval_data/world_knowledge/arc_easy.jsonl").exists()
    assert_clean()


def test_an_unresolvable_host_fails_fast_with_the_mirror_hint(monkeypatch):
    # offline (or a typo in the host): no DNS answer. Simulated at the resolver, so no lookup leaves the machine.
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.monotonic()
    with pytest.raises(fetch.FetchError, match=r"cannot resolve host 'mirror\.example'.*NANOFORGE_MIRROR"):
        fetch.probe("http://mirror.example/shard_00000.parquet", timeout=5)
    assert time.monotonic() - t0 < 5  # no retries, no backoff


def test_a_failed_dvc_add_leaves_data_dvc_as_it_was(tmp_path, monkeypatch):
    # issue 18.10: on a full cache `dvc add` fails (at times with "ERROR: failed to transfer" and exit 0)
    # after writing a data.dvc that names objects the cache does not hold
    from tests.test_checkpoint import tmpfs

    project = tmp_path / "p"
    project.mkdir()
    run("git init -q && git config user.email t@t && git config user.name t", project)
    run([tool("dvc"), "init", "-q"], project)
    monkeypatch.chdir(project)
    with tmpfs(tmp_path / "cache", "1m") as cache:
        run([tool("dvc"), "cache", "dir", str(cache)], project)
        (project / "data").mkdir()
        (project / "data/small.txt").write_text("fits")
        assert download.dvc_add("data")["status"] == "added"
        good = (project / "data.dvc").read_text()
        (project / "data/big.bin").write_bytes(os.urandom(3 << 20))  # does not fit in the cache
        with pytest.raises(download.DownloadError, match=r"`dvc add data` failed \(exit \d+: ERROR: .*No space left.*\); "
                                                         r"data.dvc was put back as it was\. The data itself is complete"
                                                         r".*`dvc cache dir`"):
            download.dvc_add("data")
        assert (project / "data.dvc").read_text() == good
        (project / "data/big.bin").rename(tmp_path / "big.bin")
        status = run([tool("dvc"), "status", "data.dvc"], project).stdout
        assert "up to date" in status and "not in cache" not in status, status  # data.dvc matches the cache
        # with no data.dvc before, none is left behind
        (project / "data.dvc").unlink()
        (tmp_path / "big.bin").rename(project / "data/big.bin")
        with pytest.raises(download.DownloadError, match=r"; no data.dvc was written\."):
            download.dvc_add("data")
        assert not (project / "data.dvc").exists()
