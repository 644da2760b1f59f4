"""Record sources, ArrayRecord preparation and the packed, mixed, sharded, resumable pipeline."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from apriel_jax.data.packing import PackingConfig
from apriel_jax.data.pipeline import ByteTextToDocument, build_dataset
from apriel_jax.data.sources import (ArrayRecordSource, DataError, JsonlSource, TfdsSource, array_record_paths,
                                     prepare_array_record)

CFG = PackingConfig(seq_len=256, patch_budget=0)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Three text sources with different length distributions (so token mixing is not doc mixing)."""
    d = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    out = {}
    for name, (lo, hi) in {"web": (10, 400), "code": (100, 700), "chat": (5, 60)}.items():
        recs = [{"text": f"{name}{i}:" + "x" * int(rng.integers(lo, hi))} for i in range(300)]
        out[name] = JsonlSource(write_jsonl(d / f"{name}.jsonl", recs))
    return out


def sources(mixture, weights=(50, 20, 30)):
    return {n: (mixture[n], w) for n, w in zip(("web", "code", "chat"), weights)}


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------- sources


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "", '{"text": "b"', {"text": "c"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        JsonlSource(path)
    src = JsonlSource(path, on_error="skip")
    assert len(src) == 2 and src.skipped == 1 and src.skipped_locations[0].endswith("bad.jsonl:3")
    assert [src[i]["text"] for i in range(2)] == ["a", "c"]
    assert src[1]["_where"].endswith("bad.jsonl:4")
    with pytest.raises(DataError, match=r"bad2\.jsonl:1"):  # valid JSON, wrong shape
        JsonlSource(write_jsonl(tmp_path / "bad2.jsonl", ["[1, 2]"]))


def _png_bytes():
    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_array_record_prepare_round_trip_with_image(tmp_path):
    png = _png_bytes()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png)
    msg = {"messages": [{"role": "user", "content": [{"type": "image", "path": "imgs/a.png"},
                                                     {"type": "text", "text": "what?"}]}]}
    records = [{"text": f"doc {i}"} for i in range(4)] + [msg]
    write_jsonl(tmp_path / "in.jsonl", records)
    manifest = prepare_array_record([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), records_per_shard=2)
    assert [s["records"] for s in manifest["shards"]] == [2, 2, 1] and manifest["records"] == 5
    src = ArrayRecordSource(array_record_paths(str(tmp_path / "out")))
    assert len(src) == 5
    assert [src[i]["text"] for i in range(4)] == [f"doc {i}" for i in range(4)]
    image = src[4]["messages"][0]["content"][0]
    assert image["type"] == "image" and "path" not in image
    assert base64.b64decode(image["image_base64"]) == png
    import pickle

    assert pickle.loads(pickle.dumps(src))[0]["text"] == "doc 0"  # workers get a working copy


def test_tfds_source_from_tiny_builder(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class AprielTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"text": f"tfds doc {i}"}

    builder = AprielTinyText(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    src = TfdsSource(builder.data_dir, "train")
    assert len(src) == 6
    assert sorted(src[i]["text"] for i in range(6)) == [f"tfds doc {i}" for i in range(6)]
    it = iter(build_dataset({"t": (src, 1.0)}, ByteTextToDocument(), PackingConfig(seq_len=32, patch_budget=0),
                            global_batch=2, seed=0))
    assert next(it)["tokens"].shape == (2, 32)


# --------------------------------------------------------------------------------------------- pipeline


def test_batch_contract_and_mixture_proportions(mixture):
    it = iter(build_dataset(sources(mixture), ByteTextToDocument(), CFG, global_batch=8, seed=1))
    for batch in take(it, 60):
        assert batch["tokens"].shape == (8, 256) and batch["patches"].shape == (8, 0, 768)
        seg = batch["segment_ids"]
        # targets: next token within the segment, else pad
        same = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
        np.testing.assert_array_equal(np.where(same, batch["tokens"][:, 1:], 0), batch["targets"][:, :-1])
        assert np.all(batch["loss_mask"][:, :-1][~same] == 0)
    props = it.stats.proportions()
    for name, w in zip(("web", "code", "chat"), (0.5, 0.2, 0.3)):
        assert abs(props[name] - w) < 0.02, props
    assert it.stats.packing.token_efficiency > 0.85
    assert sum(it.stats.source_tokens) == it.stats.packing.tokens == it.stats.batches * 8 * 256 - it.stats.packing.padding_tokens


def test_deterministic_for_a_seed(mixture):
    make = lambda seed: take(iter(build_dataset(sources(mixture), ByteTextToDocument(), CFG, 4, seed)), 5)
    a, b, c = make(3), make(3), make(4)
    assert_same(a, b)
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def _find(node, key):
    """Every value stored under ``key`` anywhere in a nested state (grain's layout is its own business)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from ([v] if k == key else _find(v, key))
    elif isinstance(node, list):
        for v in node:
            yield from _find(v, key)


def test_resume_equals_uninterrupted_run(mixture):
    ds = build_dataset(sources(mixture), ByteTextToDocument(), CFG, global_batch=4, seed=5, max_pending=4)
    it = iter(ds)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # state must survive serialisation
    assert any(_find(state, "pending")), "the checkpoint should cover rows with pending pieces"
    expected = take(it, 6)
    resumed = iter(build_dataset(sources(mixture), ByteTextToDocument(), CFG, global_batch=4, seed=5, max_pending=4))
    resumed.set_state(state)
    assert_same(take(resumed, 6), expected)
    assert resumed.stats.batches == it.stats.batches and resumed.stats.source_tokens == it.stats.source_tokens


def test_two_processes_get_disjoint_halves_of_the_global_batch(mixture):
    whole = take(iter(build_dataset(sources(mixture), ByteTextToDocument(), CFG, 4, seed=2)), 3)
    halves = [take(iter(build_dataset(sources(mixture), ByteTextToDocument(), CFG, 4, seed=2,
                                      process_index=p, process_count=2)), 3) for p in (0, 1)]
    for t in range(3):
        for k in whole[t]:
            np.testing.assert_array_equal(np.concatenate([halves[0][t][k], halves[1][t][k]]), whole[t][k])
    with pytest.raises(ValueError, match="divisible"):
        build_dataset(sources(mixture), ByteTextToDocument(), CFG, 5, seed=2, process_count=2)


def test_workers_match_in_process_pipeline(mixture):
    expected = take(iter(build_dataset(sources(mixture), ByteTextToDocument(), CFG, 4, seed=9)), 4)
    for workers in (1, 2):
        it = iter(build_dataset(sources(mixture), ByteTextToDocument(), CFG, 4, seed=9, worker_count=workers))
        try:
            assert_same(take(it, 4), expected)
        finally:
            it.close()


class ToyImageDocument:
    """Text bytes, then a 2x3 image block whose patches hold the document's length (module level: picklable)."""

    def __call__(self, record):
        from apriel_jax.data.images import image_token_layout
        from apriel_jax.data.types import Document, ImagePatches

        text = np.frombuffer(record["text"].encode(), np.uint8).astype(np.int32) + 20
        toks = np.concatenate([text, image_token_layout(2, 3, 10, 12, 13)]).astype(np.int32)
        patches = np.full((6, 768), len(toks), np.float32)
        pos = np.stack(np.meshgrid(np.arange(2), np.arange(3), indexing="ij"), -1).reshape(6, 2)
        return Document(toks, (toks >= 20).astype(np.float32), [ImagePatches(patches, pos.astype(np.int32))])


def test_images_flow_through_the_pipeline(mixture):
    cfg = PackingConfig(seq_len=256, patch_budget=24)
    # Short documents only, so none is split and a segment is a whole document.
    it = iter(build_dataset({"chat": (mixture["chat"], 1.0)}, ToyImageDocument(), cfg, global_batch=4, seed=0))
    for batch in take(it, 5):
        for b in range(4):
            slots = np.flatnonzero(batch["tokens"][b] == 10)
            n = len(slots)
            assert 0 < n <= 24 and np.array_equal(batch["patch_token_index"][b, :n], slots)
            assert np.all(batch["patch_token_index"][b, n:] == 256) and np.all(batch["patch_segment_ids"][b, n:] == 0)
            # Each image's patches carry its document's length = the length of the segment holding it.
            seg = batch["segment_ids"][b]
            for j, slot in enumerate(slots):
                assert batch["patches"][b, j, 0] == (seg == seg[slot]).sum()
    assert it.stats.packing.patches > 0 and it.stats.packing.skipped_images == 0
