"""Checkpoints, conversions and base checkpoints on ``gs://``, against the GCS API server on loopback.

Tiny random models (tests/hf_reference.py) are uploaded to the emulated bucket or written there by our
exporters; everything read back is compared byte for byte (tensors) or exactly (logits) with the same
checkpoint read from local disk.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import apriel_jax
import hf_reference as ref
import mistral_reference as mref
from apriel_jax import storage
from apriel_jax.checkpoint import orbax_io, pretrained
from apriel_jax.checkpoint.hf_config import ConfigError
from apriel_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from apriel_jax.cli import main
from apriel_jax.data import from_hf_inputs

REPO = Path(__file__).resolve().parents[1]
SHARD = "400KB"  # the 1.5 MB model in 4 shards: an index and several objects, few requests to the emulator


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A fresh staging cache per test (inherited by CLI subprocesses through the environment)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("APRIEL_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def hf_model():
    return ref.make_hf_model(ref.make_hf_config(**ref.TINY_VARIANTS["base"]), seed=5)


@pytest.fixture(scope="module")
def hf_local(hf_model, tmp_path_factory):
    """A sharded transformers-saved checkpoint on local disk, with a tokenizer file beside it."""
    path = Path(ref.save_hf_model(hf_model, tmp_path_factory.mktemp("hf") / "hf", max_shard_size=SHARD))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return path


def upload(local_dir: Path, url: str) -> str:
    for file in sorted(local_dir.iterdir()):
        storage.write_bytes(f"{url}/{file.name}", file.read_bytes())
    return url


def tensors(path) -> dict[str, bytes]:
    ckpt = SafetensorsCheckpoint(path)
    try:
        return {name: (str(ckpt.dtype(name)), ckpt.shape(name), np.asarray(ckpt.get(name)).tobytes())
                for name in ckpt.keys()}
    finally:
        ckpt.close()


def logits(model) -> np.ndarray:
    inputs = ref.make_inputs([[(32, 48)], [(16, 16), (16, 32)]], vocab_size=model.config.decoder.vocab_size, seed=3)
    batch = from_hf_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                           inputs["attention_mask"], image_token_id=model.config.image_token_id)
    return np.asarray(model({k: jnp.asarray(v) for k, v in batch.items()}))


def names(url) -> list[str]:
    return sorted(p.name for p in storage.location(url).iterdir())


def test_convert_hf_to_orbax_and_back_on_gcs_is_bit_exact(hf_local, gcs_root, capsys):
    src = upload(hf_local, f"{gcs_root}/hf")
    # hf-to-orbax as a user runs it: a fresh process, every location on the bucket.
    proc = subprocess.run([sys.executable, "-m", "apriel_jax.cli", "convert", "hf-to-orbax", src, f"{gcs_root}/orbax"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"hf-to-orbax: wrote {gcs_root}/orbax (" in proc.stdout
    assert names(f"{gcs_root}/orbax") == ["apriel_config.json", "generation_config.json", "hf_config.json", "params",
                                        "tokenizer_config.json"]
    assert not Path(REPO, "gs:").exists()  # nothing went to a local folder named after the URL

    assert main(["convert", "orbax-to-hf", f"{gcs_root}/orbax", f"{gcs_root}/hf2", "--max-shard-size", SHARD]) == 0
    assert f"orbax-to-hf: wrote {gcs_root}/hf2 (" in capsys.readouterr().out
    assert tensors(f"{gcs_root}/hf2") == tensors(hf_local)
    tokenizer = "tokenizer_config.json"
    assert storage.read_bytes(f"{gcs_root}/hf2/{tokenizer}") == (hf_local / tokenizer).read_bytes()
    assert json.loads(storage.read_text(f"{gcs_root}/hf2/model.safetensors.index.json"))["weight_map"]

    # An existing output is refused before any work unless --overwrite.
    assert main(["convert", "orbax-to-hf", f"{gcs_root}/orbax", f"{gcs_root}/hf2"]) == 2
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err


def test_from_pretrained_gcs_hf_and_orbax_match_the_local_load(hf_local, gcs_root, tmp_path, cache_dir):
    expected = logits(apriel_jax.from_pretrained(hf_local))
    src = upload(hf_local, f"{gcs_root}/hf")
    np.testing.assert_array_equal(logits(apriel_jax.from_pretrained(src)), expected)
    # The shards were read from the verified local cache.
    staged = cache_dir / "gcs" / src.removeprefix("gs://")
    shards = sorted(p.name for p in hf_local.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in staged.glob("*.safetensors")) == shards

    pretrained.hf_to_orbax(hf_local, tmp_path / "orbax")
    pretrained.hf_to_orbax(src, f"{gcs_root}/orbax")
    np.testing.assert_array_equal(logits(apriel_jax.from_pretrained(f"{gcs_root}/orbax")), expected)
    assert orbax_io.load_config(f"{gcs_root}/orbax").to_dict() == orbax_io.load_config(tmp_path / "orbax").to_dict()


def test_mistral_consolidated_on_gcs_loads_and_converts(hf_model, gcs_root, tmp_path):
    local = Path(mref.write_mistral_consolidated(hf_model, tmp_path / "mistral"))
    src = upload(local, f"{gcs_root}/mistral")
    assert pretrained.detect_format(src) == "mistral"
    np.testing.assert_array_equal(logits(apriel_jax.from_pretrained(src)), logits(apriel_jax.from_pretrained(local)))
    # And back: Mistral -> HF -> Mistral on the bucket reproduces the consolidated file.
    pretrained.mistral_to_hf(src, f"{gcs_root}/hf")
    pretrained.hf_to_mistral(f"{gcs_root}/hf", f"{gcs_root}/mistral2")
    assert names(f"{gcs_root}/mistral2") == ["consolidated.safetensors", "params.json"]
    assert tensors(f"{gcs_root}/mistral2") == tensors(local)


def test_a_gcs_export_without_its_marker_is_refused_and_overwrite_replaces_it(hf_local, gcs_root):
    hf, orbax = f"{gcs_root}/hf", f"{gcs_root}/orbax"
    pretrained.hf_to_orbax(hf_local, orbax)
    pretrained.orbax_to_hf(orbax, hf, max_shard_bytes=400_000)
    # What a writer killed before its last file leaves: everything but the marker.
    storage.location(f"{hf}/config.json").unlink()
    storage.location(f"{orbax}/{orbax_io.CONFIG_FILE}").unlink()
    with pytest.raises(ConfigError, match=r"incomplete checkpoint: safetensors but no config.json"):
        apriel_jax.from_pretrained(hf)
    with pytest.raises(ConfigError, match=rf"incomplete checkpoint: params/ but no {orbax_io.CONFIG_FILE}"):
        apriel_jax.from_pretrained(orbax)
    with pytest.raises(FileNotFoundError, match=rf"{orbax}: incomplete model directory"):
        orbax_io.load_state(orbax)
    with pytest.raises(FileNotFoundError, match=rf"{orbax}: incomplete model directory"):
        pretrained.orbax_to_hf(orbax, f"{gcs_root}/elsewhere")
    assert main(["convert", "orbax-to-hf", orbax, f"{gcs_root}/elsewhere"]) == 2

    # Writing again replaces what was left (with overwrite: the leftover is named, not silently replaced).
    pretrained.hf_to_orbax(hf_local, orbax, overwrite=True)
    with pytest.raises(FileExistsError, match="it has no config.json: probably an interrupted write"):
        pretrained.orbax_to_hf(orbax, hf)
    pretrained.orbax_to_hf(orbax, hf, overwrite=True, max_shard_bytes=400_000)
    assert tensors(hf) == tensors(hf_local)
    assert "config.json" in names(hf) and pretrained.detect_format(orbax) == "orbax"


def test_missing_checkpoints_and_buckets_are_named(gcs_root):
    with pytest.raises(FileNotFoundError, match=f"{gcs_root}/absent: no such checkpoint directory"):
        apriel_jax.from_pretrained(f"{gcs_root}/absent")
    with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket does not exist"):
        apriel_jax.from_pretrained("gs://no-such-bucket/model")
    with pytest.raises(storage.StorageError, match="gs://forbidden/model: cannot read: permission denied"):
        apriel_jax.from_pretrained("gs://forbidden/model")


def test_staged_copies_are_verified_again_before_reuse(hf_local, gcs_root, cache_dir):
    src = upload(hf_local, f"{gcs_root}/hf")
    expected = tensors(hf_local)
    assert tensors(src) == expected
    staged = cache_dir / "gcs" / src.removeprefix("gs://")
    shard, other = sorted(staged.glob("*.safetensors"))[:2]
    shard_inode, other_inode = os.stat(shard).st_ino, os.stat(other).st_ino

    # A truncated copy (a full disk, a killed copy by hand) and a stamp that no longer matches the object.
    with open(shard, "r+b") as f:
        f.truncate(100)
    stamp = Path(f"{other}.verified.json")
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "crc32c": "AAAAAA=="}))
    assert tensors(src) == expected
    assert os.stat(shard).st_ino != shard_inode and os.stat(other).st_ino != other_inode  # both downloaded again
    assert os.path.getsize(shard) == storage.location(f"{src}/{shard.name}").stat().length
    # An intact copy is reused as it is.
    untouched = sorted(staged.glob("*.safetensors"))[2]
    inode = os.stat(untouched).st_ino
    assert tensors(src) == expected and os.stat(untouched).st_ino == inode
