"""Tests for apriel_jax.checkpoint.safetensors_io against the official library."""

import json
import re
import weakref

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st_np
import safetensors.torch as st_torch
import torch
from safetensors import safe_open

from apriel_jax.checkpoint.safetensors_io import (
    CheckpointError,
    SafetensorsCheckpoint,
    SafetensorsFile,
    TensorSpec,
    write_safetensors_checkpoint,
)


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


def _numpy_arrays(rng):
    """One random array per numpy-native dtype, incl. 0-d and empty edge cases."""
    return {
        "model.a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "model.b.f64": rng.standard_normal(7),
        "model.c.f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "model.d.i64": rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64),
        "model.e.i32": rng.integers(-1000, 1000, size=(2, 2), dtype=np.int32),
        "model.f.i16": rng.integers(-300, 300, size=(9,), dtype=np.int16),
        "model.g.i8": rng.integers(-128, 127, size=(4, 2), dtype=np.int8),
        "model.h.u8": rng.integers(0, 255, size=(3, 3), dtype=np.uint8),
        "model.i.bool": rng.random((3, 4)) > 0.5,
        "model.j.scalar": np.asarray(rng.standard_normal(), dtype=np.float32),
        "model.k.empty": np.empty((0, 4), dtype=np.float32),
    }


def _with_bf16(rng):
    arrays = _numpy_arrays(rng)
    arrays["model.l.bf16"] = rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16)
    arrays["model.m.bf16_odd"] = rng.standard_normal((3,)).astype(ml_dtypes.bfloat16)
    return arrays


def _to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:  # torch cannot import ml_dtypes arrays directly
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _assert_same(ours: np.ndarray, ref: np.ndarray):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    # Bitwise comparison so bf16/fp8 and NaN payloads are checked exactly.
    assert ours.tobytes() == ref.tobytes()


def _specs(arrays, calls=None):
    def make(name, arr):
        def produce():
            if calls is not None:
                calls.append(name)
            return arr
        return TensorSpec(name, arr.shape, arr.dtype, produce)
    return [make(k, v) for k, v in arrays.items()]


def _leftovers(parent, stem):
    return [p.name for p in parent.iterdir() if p.name.startswith(stem + ".")]


# ----------------------------------------------------------- reading official files

def test_reads_numpy_save_file(tmp_path, rng):
    arrays = _numpy_arrays(rng)
    path = tmp_path / "ref.safetensors"
    st_np.save_file(arrays, str(path), metadata={"note": "hello"})
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(arrays)
        assert f.metadata["note"] == "hello"
        for name, ref in arrays.items():
            assert f.shape(name) == ref.shape and f.dtype(name) == ref.dtype
            assert f.nbytes(name) == ref.nbytes
            _assert_same(f.get(name), ref)


def test_reads_torch_save_file_incl_bf16_and_fp8(tmp_path):
    gen = torch.Generator().manual_seed(7)
    tensors = {
        "w.bf16": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "w.f32": torch.randn(3, 2, generator=gen),
        "w.f16": torch.randn(8, generator=gen).half(),
        "w.i64": torch.randint(-(2**40), 2**40, (4,), generator=gen),
        "w.f8e4m3": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
        "w.f8e5m2": torch.randn(6, generator=gen).to(torch.float8_e5m2),
    }
    path = tmp_path / "torch.safetensors"
    st_torch.save_file(tensors, str(path))
    with SafetensorsFile(path) as f:
        assert f.metadata == {}
        assert f.dtype("w.bf16") == np.dtype(ml_dtypes.bfloat16)
        assert f.dtype("w.f8e4m3") == np.dtype(ml_dtypes.float8_e4m3fn)
        for name, t in tensors.items():
            ours = f.get(name)
            assert ours.shape == tuple(t.shape)
            bits = t.view(torch.uint8) if t.element_size() == 1 else t.view(
                {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
            assert ours.tobytes() == bits.numpy().tobytes()
            np.testing.assert_array_equal(ours.astype(np.float32), t.float().numpy())


# ------------------------------------------------------- official reader on our files

def test_write_single_file_loads_with_official_library(tmp_path, rng):
    arrays = _with_bf16(rng)
    out = tmp_path / "ckpt"
    index = write_safetensors_checkpoint(out, _specs(arrays), metadata={"origin": "test"},
                                         extra_files={"config.json": '{"a": 1}',
                                                      "tok.bin": b"\x00\x01"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tok.bin"]
    assert (out / "config.json").read_text() == '{"a": 1}'
    assert (out / "tok.bin").read_bytes() == b"\x00\x01"
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    path = str(out / "model.safetensors")
    # Header is 8-byte aligned and padded with spaces, as the reference does.
    raw = (out / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8:8 + n].decode().rstrip(" ").endswith("}")

    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}
    loaded_t = st_torch.load_file(path)
    assert sorted(loaded_t) == sorted(arrays)
    for name, ref in arrays.items():
        assert loaded_t[name].dtype == _to_torch(ref).dtype
        assert torch.equal(loaded_t[name], _to_torch(ref))
    # safetensors.numpy has no bfloat16, so check it on a numpy-only checkpoint.
    np_arrays = _numpy_arrays(rng)
    write_safetensors_checkpoint(tmp_path / "np", _specs(np_arrays))
    loaded_np = st_np.load_file(str(tmp_path / "np" / "model.safetensors"))
    assert sorted(loaded_np) == sorted(np_arrays)
    for name, ref in np_arrays.items():
        _assert_same(loaded_np[name], ref)


def test_write_sharded_loads_with_official_library(tmp_path, rng):
    arrays = {f"layers.{i}.w": rng.standard_normal((16, 16)).astype(np.float32)
              for i in range(7)}
    arrays["layers.x.bf16"] = rng.standard_normal((20, 10)).astype(ml_dtypes.bfloat16)
    arrays["big"] = rng.standard_normal((40, 40)).astype(np.float32)  # > limit alone
    out = tmp_path / "sharded"
    write_safetensors_checkpoint(out, _specs(arrays), max_shard_bytes=2500)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    assert set(index["weight_map"]) == set(arrays)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s)
               for s in shards)
    assert set(index["weight_map"].values()) == set(shards)

    seen = {}
    for shard in shards:
        loaded = st_torch.load_file(str(out / shard))
        assert all(index["weight_map"][k] == shard for k in loaded)
        seen.update(loaded)
    assert sorted(seen) == sorted(arrays)
    for name, ref in arrays.items():
        assert torch.equal(seen[name], _to_torch(ref))

    with SafetensorsCheckpoint(out) as ckpt:
        assert sorted(ckpt.keys()) == sorted(arrays) and ckpt.unindexed == {}
        assert "big" in ckpt and "nope" not in ckpt
        for name, ref in arrays.items():
            assert ckpt.shape(name) == ref.shape and ckpt.dtype(name) == ref.dtype
            _assert_same(ckpt.get(name), ref)
            assert ckpt.file_of(name).name == index["weight_map"][name]
        np.testing.assert_array_equal(ckpt.get_slice("big", (slice(2, 5), 7)),
                                      arrays["big"][2:5, 7])
        with pytest.raises(KeyError, match="nope"):
            ckpt.get("nope")


def test_checkpoint_discovery(tmp_path, rng):
    arrays = _numpy_arrays(rng)
    d = tmp_path / "consolidated"
    d.mkdir()
    st_np.save_file(arrays, str(d / "consolidated.safetensors"))
    for ckpt in (SafetensorsCheckpoint(d), SafetensorsCheckpoint(d / "consolidated.safetensors"),
                 SafetensorsCheckpoint(d, "consolidated.safetensors")):
        assert sorted(ckpt.keys()) == sorted(arrays)
        _assert_same(ckpt.get("model.a.f32"), arrays["model.a.f32"])
    st_np.save_file(arrays, str(d / "other.safetensors"))
    with pytest.raises(CheckpointError, match="filename="):
        SafetensorsCheckpoint(d)  # ambiguous: two candidate files, no index
    assert len(SafetensorsCheckpoint(d, "other.safetensors")) == len(arrays)


def test_transformers_save_pretrained_round_trip(tmp_path):
    """HF sharded bf16 checkpoint -> our reader -> our writer -> from_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="8KB")
    ref = model.state_dict()
    ck = SafetensorsCheckpoint(tmp_path / "hf")
    assert sorted(ck.keys()) == sorted(ref) and len(ck.files) >= 3
    for name, t in ref.items():
        assert ck.get(name).tobytes() == t.view(torch.int16).numpy().tobytes()

    specs = [TensorSpec(k, ck.shape(k), ck.dtype(k), lambda k=k: ck.get(k)) for k in ck.keys()]
    out = tmp_path / "ours"
    write_safetensors_checkpoint(out, specs, max_shard_bytes=8000, extra_files={
        "config.json": (tmp_path / "hf" / "config.json").read_text()})
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, t in reloaded.state_dict().items():
        assert torch.equal(t, ref[name]), name


# ---------------------------------------------------------------------- laziness

def test_produce_called_once_in_order_and_released(tmp_path, rng):
    names = [f"t{i}" for i in range(8)]
    calls, refs = [], []

    def make(i):
        def produce():
            calls.append(names[i])
            # Every earlier array must already be freed: one tensor in memory.
            assert all(r() is None for r in refs), "an earlier tensor is still alive"
            arr = rng.standard_normal((32, 8)).astype(np.float32)
            refs.append(weakref.ref(arr))
            return arr
        return TensorSpec(names[i], (32, 8), np.float32, produce)

    specs = [make(i) for i in range(len(names))]
    # A generator on purpose: the writer must materialise specs, not arrays.
    write_safetensors_checkpoint(tmp_path / "lazy", iter(specs), max_shard_bytes=3100)
    assert calls == names  # exactly once each, in the given order, across shards
    assert len(list((tmp_path / "lazy").glob("*.safetensors"))) == 3  # 3 + 3 + 2 tensors


def test_get_is_zero_copy_readonly_memmap_view(tmp_path, rng):
    arrays = _with_bf16(rng)
    write_safetensors_checkpoint(tmp_path / "c", _specs(arrays))
    f = SafetensorsFile(tmp_path / "c" / "model.safetensors")
    a, b = f.get("model.a.f32"), f.get("model.a.f32")
    assert not a.flags.owndata and not a.flags.writeable
    assert np.shares_memory(a, b)  # both are views of the same mapping
    base = a
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    row = f.get_slice("model.l.bf16", 2)
    assert not row.flags.owndata and np.shares_memory(row, f.get("model.l.bf16"))
    _assert_same(row, arrays["model.l.bf16"][2])
    f.close()
    _assert_same(a, arrays["model.a.f32"])  # views stay valid after close
    with pytest.raises(ValueError, match="closed"):
        f.get("model.a.f32")


# ------------------------------------------------------------------------ errors

def _raw_file(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def test_truncated_file_detected_at_open(tmp_path, rng):
    arrays = _numpy_arrays(rng)
    path = tmp_path / "t.safetensors"
    st_np.save_file(arrays, str(path))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated") as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value) and e.value.tensor in arrays
    # Cut inside the header: the length prefix points past the end of the file.
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="header length") as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)


def test_truncated_shard_detected_at_checkpoint_open(tmp_path, rng):
    arrays = {f"w{i}": rng.standard_normal((10, 10)).astype(np.float32) for i in range(6)}
    out = tmp_path / "ck"
    write_safetensors_checkpoint(out, _specs(arrays), max_shard_bytes=900)
    shard = out / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="truncated") as e:
        SafetensorsCheckpoint(out)
    assert str(shard) in str(e.value)


def test_corrupted_header_json(tmp_path, rng):
    path = tmp_path / "c.safetensors"
    st_np.save_file(_numpy_arrays(rng), str(path))
    raw = bytearray(path.read_bytes())
    raw[8] = ord("x")  # first header byte is "{"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="invalid JSON") as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("header, pattern", [
    ({"bad": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, "needs 24"),
    ({"bad": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
    ({"bad": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, "shape"),
    ({"bad": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "data_offsets"),
    ({"ok": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "bad": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "overlaps tensor 'ok'"),
    ({"__metadata__": {"format": 1}}, "__metadata__"),
])
def test_invalid_headers(tmp_path, rng, header, pattern):
    path = _raw_file(tmp_path / "h.safetensors", header, rng.bytes(64))
    with pytest.raises(CheckpointError, match=pattern) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)
    if "bad" in header:
        assert "'bad'" in str(e.value) and e.value.tensor == "bad"


def test_index_names_missing_tensor_and_unindexed(tmp_path, rng):
    arrays = {f"w{i}": rng.standard_normal((10, 10)).astype(np.float32) for i in range(6)}
    out = tmp_path / "ck"
    write_safetensors_checkpoint(out, _specs(arrays), max_shard_bytes=900)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    bad = json.loads(json.dumps(index))
    bad["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="ghost.weight") as e:
        SafetensorsCheckpoint(out)
    assert "model-00001-of-00003.safetensors" in str(e.value)
    # Lazy mode reports it when the shard is first touched.
    lazy = SafetensorsCheckpoint(out, validate=False)
    with pytest.raises(CheckpointError, match="ghost.weight"):
        lazy.get("ghost.weight")

    dropped = json.loads(json.dumps(index))
    del dropped["weight_map"]["w0"]
    index_path.write_text(json.dumps(dropped))
    with pytest.warns(UserWarning, match="not mapped"):
        ckpt = SafetensorsCheckpoint(out)
    assert ckpt.unindexed == {"model-00001-of-00003.safetensors": ["w0"]}
    with pytest.raises(CheckpointError, match="'w0'"):
        SafetensorsCheckpoint(out, strict=True)

    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid index JSON"):
        SafetensorsCheckpoint(out)


@pytest.mark.parametrize("wrong", ["shape", "dtype"])
def test_bad_produce_leaves_nothing_behind(tmp_path, rng, wrong):
    arrays = {f"w{i}": rng.standard_normal((10, 10)).astype(np.float32) for i in range(6)}
    specs = _specs(arrays)
    good = arrays["w3"]
    bad = good[:, :5] if wrong == "shape" else good.astype(np.float64)
    specs[3] = TensorSpec("w3", good.shape, good.dtype, lambda: bad)  # in the 2nd shard
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=wrong) as e:
        write_safetensors_checkpoint(out, specs, max_shard_bytes=900)
    assert e.value.tensor == "w3" and "'w3'" in str(e.value)
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == []


def test_existing_output_dir(tmp_path, rng):
    arrays = {"w": rng.standard_normal((4, 4)).astype(np.float32)}
    out = tmp_path / "out"
    out.mkdir()
    write_safetensors_checkpoint(out, _specs(arrays))  # empty dir is fine
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        write_safetensors_checkpoint(out, _specs(arrays))
    assert (out / "stale.txt").read_text() == "old"  # untouched

    arrays2 = {"v": rng.standard_normal((3,)).astype(np.float32)}
    write_safetensors_checkpoint(out, _specs(arrays2), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    _assert_same(SafetensorsCheckpoint(out).get("v"), arrays2["v"])
    assert _leftovers(tmp_path, "out") == []

    with pytest.raises(CheckpointError, match="duplicate"):
        write_safetensors_checkpoint(tmp_path / "dup", _specs(arrays) * 2)
    assert not (tmp_path / "dup").exists()
