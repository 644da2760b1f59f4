"""The storage layer (apriel_jax.storage) on local disk and on a GCS API server on loopback.

Markers, atomic files, globs, spooled logs, the verified download cache and the one-line errors for a
missing bucket, a refused permission and absent credentials.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apriel_jax import storage
from apriel_jax.storage import gcs

REPO = Path(__file__).resolve().parents[1]


def test_location_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(storage.location("gs://bkt/a/b")) == "gs://bkt/a/b"
    assert os.fspath(storage.location("gs://bkt/a") / "b") == "gs://bkt/a/b"
    assert os.fspath(storage.location("runs/x")) == str(tmp_path / "runs" / "x")
    assert storage.is_remote("gs://bkt/x") and not storage.is_remote(tmp_path)
    with pytest.raises(storage.StorageError, match="unsupported scheme s3://"):
        storage.location("s3://bkt/x")
    with pytest.raises(storage.StorageError, match="no bucket name"):
        storage.location("gs:///x")


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("gcs_root")


def test_globs_expand_sorted_and_unmatched_patterns_name_themselves(root):
    for name in ("b-1.rec", "a-2.rec", "a-1.rec", "notes.txt"):
        storage.write_bytes(f"{root}/data/{name}", name.encode())
    assert storage.expand_patterns(f"{root}/data/*.rec") == [f"{root}/data/{n}" for n in ("a-1.rec", "a-2.rec",
                                                                                           "b-1.rec")]
    # Lists keep their order; each glob is sorted within itself.
    got = storage.expand_patterns([f"{root}/data/notes.txt", f"{root}/data/a-*.rec"])
    assert got == [f"{root}/data/notes.txt", f"{root}/data/a-1.rec", f"{root}/data/a-2.rec"]
    with pytest.raises(FileNotFoundError, match=r"pattern '.*/data/\*.parquet' matches no file"):
        storage.expand_patterns(f"{root}/data/*.parquet")
    with pytest.raises(FileNotFoundError, match="missing.rec does not exist"):
        storage.expand_patterns(f"{root}/data/missing.rec")


def test_new_directory_appears_whole_with_its_marker_written_last(root):
    out = f"{root}/model"
    with storage.new_directory(out, marker="config.json") as d:
        (d / "weights.bin").write_bytes(b"w" * 100)
        (d / "config.json").write_text("{}")
    assert sorted(p.name for p in storage.location(out).iterdir()) == ["config.json", "weights.bin"]
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        with storage.new_directory(out, marker="config.json"):
            pass
    # A failed overwrite leaves no trusted directory behind: never a mix of old and new files.
    with pytest.raises(RuntimeError, match="boom"):
        with storage.new_directory(out, marker="config.json", overwrite=True) as d:
            (d / "weights.bin").write_bytes(b"new")
            raise RuntimeError("boom")
    loc = storage.location(out)
    assert not (loc / "config.json").exists() or (loc / "weights.bin").read_bytes() == b"w" * 100
    with storage.new_directory(out, marker="config.json", overwrite=True) as d:
        (d / "weights.bin").write_bytes(b"v2")
        (d / "config.json").write_text('{"v": 2}')
    assert (loc / "weights.bin").read_bytes() == b"v2"
    # Forgetting the marker is a bug of the writer, and nothing is published.
    with pytest.raises(RuntimeError, match="without writing its marker"):
        with storage.new_directory(f"{root}/other", marker="config.json") as d:
            (d / "weights.bin").write_bytes(b"x")
    assert not (storage.location(f"{root}/other") / "weights.bin").exists()


def test_a_remote_directory_without_its_marker_is_named_as_interrupted(gcs_root):
    storage.write_bytes(f"{gcs_root}/model/weights.bin", b"half")  # what a killed writer leaves
    with pytest.raises(FileExistsError, match="no config.json: probably an interrupted write"):
        with storage.new_directory(f"{gcs_root}/model", marker="config.json"):
            pass
    with storage.new_directory(f"{gcs_root}/model", marker="config.json", overwrite=True) as d:
        (d / "config.json").write_text("{}")
    assert [p.name for p in storage.location(f"{gcs_root}/model").iterdir()] == ["config.json"]


def test_append_log_continues_a_remote_log_and_uploads_on_flush(gcs_root):
    path = f"{gcs_root}/run/metrics.jsonl"
    log = storage.AppendLog(path, upload_every_s=3600)
    log.write(json.dumps({"step": 1}))
    assert not storage.location(path).exists()  # not yet: the interval has not passed
    log.flush()
    assert storage.read_text(path) == '{"step": 1}\n'
    log.write(json.dumps({"step": 2}))
    log.close()
    resumed = storage.AppendLog(path, upload_every_s=0)
    resumed.write(json.dumps({"step": 3}))  # an interval of 0 uploads at every write
    assert [json.loads(x)["step"] for x in storage.read_text(path).splitlines()] == [1, 2, 3]
    resumed.close()


def test_spooled_directory_uploads_changed_files(gcs_root):
    spool = storage.SpooledDirectory(f"{gcs_root}/tb")
    Path(spool.local_dir, "sub").mkdir()
    Path(spool.local_dir, "sub", "events.1").write_bytes(b"abc")
    spool.sync()
    assert storage.read_bytes(f"{gcs_root}/tb/sub/events.1") == b"abc"
    with open(Path(spool.local_dir, "sub", "events.1"), "ab") as f:
        f.write(b"def")
    spool.close()
    assert storage.read_bytes(f"{gcs_root}/tb/sub/events.1") == b"abcdef"
    assert not os.path.exists(spool.local_dir)


def test_staged_copies_are_verified_and_reused(gcs_root, tmp_path):
    url = f"{gcs_root}/ckpt/model.safetensors"
    storage.write_bytes(url, os.urandom(3 * 2**20 + 5))
    local = storage.local_copy(url, cache_dir=str(tmp_path))
    assert Path(local).read_bytes() == storage.read_bytes(url)
    stamp = json.loads(Path(local + ".verified.json").read_text())
    assert stamp["size"] == 3 * 2**20 + 5 and stamp["crc32c"] == gcs.crc32c_of_file(local)
    mtime = os.stat(local).st_mtime_ns
    assert storage.local_copy(url, cache_dir=str(tmp_path)) == local and os.stat(local).st_mtime_ns == mtime
    # A new object generation (the checkpoint was replaced) is downloaded again.
    storage.write_bytes(url, b"replaced")
    assert Path(storage.local_copy(url, cache_dir=str(tmp_path))).read_bytes() == b"replaced"


def test_missing_bucket_and_refused_permission_are_one_line_errors(gcs_server):
    with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket does not exist"):
        storage.read_bytes("gs://no-such-bucket/x.json")
    with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket does not exist"):
        storage.preflight(write=["gs://no-such-bucket/run"])
    with pytest.raises(storage.StorageError, match="gs://forbidden/run: cannot write: permission denied"):
        storage.preflight(write=["gs://forbidden/run"])
    with pytest.raises(storage.StorageError, match="gs://forbidden/a.json: cannot read: permission denied"):
        storage.read_bytes("gs://forbidden/a.json")
    with pytest.raises(FileNotFoundError, match="apriel-test/nothing-here.json: no such object"):
        storage.read_bytes("gs://apriel-test/nothing-here.json")


def test_no_credentials_names_what_to_set(tmp_path):
    """Against real GCS with no credentials anywhere: the CLI says which variable or login is missing."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
                        "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_APPLICATION_CREDENTIALS")}
    # No gcloud config in HOME, and the metadata server (present on GCE/TPU VMs) refuses at once.
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), GCE_METADATA_HOST="127.0.0.1:9",
               GCE_METADATA_IP="127.0.0.1:9")
    cmd = [sys.executable, "-m", "apriel_jax.cli", "train", str(REPO / "configs" / "train" / "tiny_text.py"),
           "--config.run_dir=gs://some-bucket/runs/x", "--config.steps=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "GOOGLE_APPLICATION_CREDENTIALS" in last and "gcloud auth application-default login" in last
    assert not (tmp_path / "gs:").exists() and not Path(REPO, "gs:").exists()  # nothing written locally
