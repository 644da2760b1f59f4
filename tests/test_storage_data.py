"""Training data in a bucket: sources, globs, `data prepare`, Parquet, TFDS, images and tokenizers on gs://.

Everything runs against the GCS API server on loopback of ``tests/gcs_server.py`` (the ``gcs_server`` /
``gcs_root`` fixtures); the local variants run the same assertions on ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apriel_jax import storage
from apriel_jax.data.columns import Columns
from apriel_jax.data.images import load_image
from apriel_jax.data.parquet import ParquetSource
from apriel_jax.data.records import RecordToDocument
from apriel_jax.data.sources import (ArrayRecordSource, DataError, JsonlSource, TfdsSource, array_record_paths,
                                     expand_data_paths, prepare_array_record)
from apriel_jax.data.tokenizer import load_tokenizer, train_tiny_tokenizer
from apriel_jax.train import inputs
from apriel_jax.train.config import source, train_config, validate_train_config

REPO = Path(__file__).resolve().parents[1]


def _png(value: int, size=(4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("gcs_root")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    texts = [f"the image shows {i} squares and a caption" for i in range(50)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tiny_tokenizer(texts, 400, path)
    return str(path)


def _chat(image_part: dict, question: str) -> dict:
    return {"messages": [{"role": "user", "content": [image_part, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": "an answer"}]}


# --------------------------------------------------------------------------------------- prepare


def test_prepare_to_gcs_then_read_the_shards_by_glob_and_by_directory(gcs_root):
    # The JSONL lives in the bucket; one image is relative to it, one is a gs:// URL elsewhere.
    storage.write_bytes(f"{gcs_root}/raw/imgs/a.png", _png(10))
    storage.write_bytes(f"{gcs_root}/other/b.png", _png(200))
    records = [{"text": f"doc {i}"} for i in range(3)]
    records += [_chat({"type": "image", "path": "imgs/a.png"}, "what is a?"),
                _chat({"type": "image", "path": f"{gcs_root}/other/b.png"}, "what is b?")]
    storage.write_bytes(f"{gcs_root}/raw/part-1.jsonl", _jsonl(records[:2]))
    storage.write_bytes(f"{gcs_root}/raw/part-2.jsonl", _jsonl(records[2:]))

    manifest = prepare_array_record(f"{gcs_root}/raw/*.jsonl", f"{gcs_root}/ar", records_per_shard=2)
    assert [s["records"] for s in manifest["shards"]] == [2, 2, 1]
    assert json.loads(storage.read_text(f"{gcs_root}/ar/manifest.json")) == manifest
    by_glob = expand_data_paths(f"{gcs_root}/ar/*.array_record")
    assert by_glob == expand_data_paths(f"{gcs_root}/ar") == array_record_paths(f"{gcs_root}/ar")
    assert by_glob == [f"{gcs_root}/ar/data-0000{i}-of-00003.array_record" for i in range(3)]

    src = ArrayRecordSource(by_glob)
    assert len(src) == 5 and [src[i]["text"] for i in range(3)] == ["doc 0", "doc 1", "doc 2"]
    import base64

    got = [base64.b64decode(src[i]["messages"][0]["content"][0]["image_base64"]) for i in (3, 4)]
    assert got == [_png(10), _png(200)]
    assert src[4]["_where"] == f"{gcs_root}/ar/data-00002-of-00003.array_record#record 0"
    assert pickle.loads(pickle.dumps(src))[1]["text"] == "doc 1"  # what a grain worker gets
    assert not Path("gs:").exists() and not Path(REPO, "gs:").exists()  # nothing written to a local "gs:" folder


def test_a_failed_prepare_leaves_the_old_output_and_overwrite_replaces_it(root):
    good = f"{root}/good.jsonl"
    storage.write_bytes(good, _jsonl([{"text": "old"}]))
    out = f"{root}/ar"
    prepare_array_record(good, out)
    old = {p: storage.read_bytes(p) for p in [*array_record_paths(out), f"{out}/manifest.json"]}

    with pytest.raises(FileExistsError, match="exists and is not empty"):
        prepare_array_record(good, out)
    # A bad line is found before anything is written: the old output stays whole, locally and in the bucket.
    storage.write_bytes(f"{root}/bad.jsonl", _jsonl([{"text": "new"}, '{"text": ']))
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        prepare_array_record(f"{root}/bad.jsonl", out, overwrite=True)
    assert {p: storage.read_bytes(p) for p in old} == old

    # An image that cannot be read is found by the checks, before anything is written: the old output stays
    # whole, locally and in the bucket.
    no_image = _chat({"type": "image", "path": "x.png"}, "?")
    storage.write_bytes(f"{root}/noimg.jsonl", _jsonl([{"text": "new"}, no_image]))
    with pytest.raises(DataError, match=r"noimg\.jsonl:2: cannot read image"):
        prepare_array_record(f"{root}/noimg.jsonl", out, overwrite=True, records_per_shard=1)
    assert {p: storage.read_bytes(p) for p in old} == old
    if storage.is_remote(root):
        # What a prepare killed while uploading an overwrite leaves (shard objects, no manifest) is refused.
        storage.location(f"{out}/manifest.json").unlink()
        storage.write_bytes(f"{out}/data-00000-of-00002.array_record", b"a complete shard")
        with pytest.raises(FileNotFoundError, match="no manifest.json: .* or an incomplete one"):
            expand_data_paths(out)
    else:
        assert sorted(os.listdir(root)) == ["ar", "bad.jsonl", "good.jsonl", "noimg.jsonl"]  # no partial left

    storage.write_bytes(f"{root}/new.jsonl", _jsonl([{"text": f"new {i}"} for i in range(3)]))
    manifest = prepare_array_record(f"{root}/new.jsonl", out, overwrite=True, records_per_shard=2)
    src = ArrayRecordSource(expand_data_paths(out))
    assert manifest["records"] == 3 and [src[i]["text"] for i in range(3)] == ["new 0", "new 1", "new 2"]
    assert sorted(p.name for p in storage.location(out).iterdir()) == [
        "data-00000-of-00002.array_record", "data-00001-of-00002.array_record", "manifest.json"]


def test_data_cli_prepares_into_and_inspects_from_the_bucket(gcs_root, tokenizer_file):
    storage.write_bytes(f"{gcs_root}/raw/a.jsonl", _jsonl([{"text": "the image shows 3 squares"}] * 3))
    storage.write_bytes(f"{gcs_root}/raw/img.png", _png(90, (32, 32)))
    storage.write_bytes(f"{gcs_root}/raw/b.jsonl", _jsonl([_chat({"type": "image", "path": "img.png"}, "how many?")]))
    storage.write_bytes(f"{gcs_root}/tok/tokenizer.json", Path(tokenizer_file).read_bytes())
    cli = [sys.executable, "-m", "apriel_jax.cli", "data"]

    def run(*args):
        return subprocess.run([*cli, *args], cwd=REPO, capture_output=True, text=True, timeout=600)

    prep = run("prepare", f"{gcs_root}/raw/*.jsonl", "--out", f"{gcs_root}/ar", "--records-per-shard", "2")
    assert prep.returncode == 0, prep.stderr
    assert f"{gcs_root}/ar/data-00001-of-00002.array_record: 2 records" in prep.stdout
    again = run("prepare", f"{gcs_root}/raw/a.jsonl", "--out", f"{gcs_root}/ar")
    assert again.returncode == 2 and "exists and is not empty" in again.stderr.strip().splitlines()[-1]
    assert run("prepare", f"{gcs_root}/raw/*.jsonl", "--out", f"{gcs_root}/ar", "--overwrite").returncode == 0
    assert len(array_record_paths(f"{gcs_root}/ar")) == 1

    shown = run("inspect", f"{gcs_root}/ar", "--tokenizer", f"{gcs_root}/tok", "--rows", "4", "--seq-len", "256",
                "--patch-budget", "16")
    assert shown.returncode == 0, shown.stderr
    assert "<image 2x2>" in shown.stdout and "records: 4 read, 0 skipped" in shown.stdout
    missing = run("inspect", f"{gcs_root}/nothing/*.jsonl", "--tokenizer", f"{gcs_root}/tok")
    assert missing.returncode == 2 and "matches no file" in missing.stderr.strip().splitlines()[-1]
    assert not Path(REPO, "gs:").exists()


# ------------------------------------------------------------------------------------ file lists


def test_resolve_records_the_listing_and_a_resumed_run_keeps_it(gcs_root, caplog):
    for i in (1, 2):
        storage.write_bytes(f"{gcs_root}/text/part-{i}.txt", f"paragraph {i}a\n\nparagraph {i}b".encode())
    cfg = train_config()
    cfg.data.sources = [source("text", "bytes_text", [f"{gcs_root}/text/*.txt"])]
    cfg.eval.sources = [source("held_out", "bytes_text", [f"{gcs_root}/text/part-2.txt"])]
    inputs.resolve_data_files(cfg)
    first = [f"{gcs_root}/text/part-1.txt", f"{gcs_root}/text/part-2.txt"]
    assert cfg.data.sources[0]["files"] == first and cfg.eval.sources[0]["files"] == first[1:]
    assert inputs.make_source(cfg.data.sources[0], cfg, seed=0)[3] == {"text": "paragraph 2b"}
    recorded = json.loads(json.dumps(cfg.to_dict()))  # what a checkpoint's meta keeps

    storage.write_bytes(f"{gcs_root}/text/part-0.txt", b"a paragraph that appeared later")
    resumed = train_config()
    resumed.data.sources = [source("text", "bytes_text", [f"{gcs_root}/text/*.txt"])]
    with caplog.at_level(logging.WARNING, logger="apriel_jax.train.inputs"):
        inputs.resolve_data_files(resumed, recorded)
    assert resumed.data.sources[0]["files"] == first
    assert "now match 3 files (1 new, 0 gone); reading the 2 files this run started with" in caplog.text

    fresh = train_config()
    fresh.data.sources = [source("text", "bytes_text", [f"{gcs_root}/text/*.txt"])]
    inputs.resolve_data_files(fresh)
    assert fresh.data.sources[0]["files"] == [f"{gcs_root}/text/part-0.txt", *first]
    # Other paths under the same name are a new listing, not the recorded one.
    changed = train_config()
    changed.data.sources = [source("text", "bytes_text", [f"{gcs_root}/text/part-0.txt"])]
    inputs.resolve_data_files(changed, recorded)
    assert changed.data.sources[0]["files"] == [f"{gcs_root}/text/part-0.txt"]

    # Every file gone: the run resumes with its recorded list (reading them then fails, naming the file).
    storage.remove_tree(f"{gcs_root}/text")
    gone = train_config()
    gone.data.sources = [source("text", "bytes_text", [f"{gcs_root}/text/*.txt"])]
    with caplog.at_level(logging.WARNING, logger="apriel_jax.train.inputs"):
        inputs.resolve_data_files(gone, recorded)
    assert gone.data.sources[0]["files"] == first and "matches no file; reading the 2 files" in caplog.text

    none = train_config()
    none.data.sources = [source("text", "jsonl", [f"{gcs_root}/text/*.jsonl"])]
    with pytest.raises(FileNotFoundError, match=r"source 'text': the pattern '.*/text/\*\.jsonl' matches no file"):
        inputs.resolve_data_files(none)


def test_a_run_reads_shards_from_the_bucket_by_glob_and_records_them(gcs_root, tmp_path, caplog):
    from apriel_jax.train.checkpointing import RunCheckpointer
    from apriel_jax.train.loop import train

    storage.write_bytes(f"{gcs_root}/raw/a.jsonl", _jsonl([{"text": f"record {i}: " + "abc " * i} for i in range(16)]))
    prepare_array_record(f"{gcs_root}/raw/a.jsonl", f"{gcs_root}/data/text", records_per_shard=8)
    shards = array_record_paths(f"{gcs_root}/data/text")

    def config():
        cfg = train_config()
        cfg.run_dir = str(tmp_path / "run")
        cfg.data.sources = [source("text", "array_record", [f"{gcs_root}/data/text/*.array_record"])]
        cfg.data.update(seq_len=32, global_batch=8)
        cfg.steps = 2
        cfg.checkpoint.update(save_every=2, async_save=False)
        cfg.log.update(tensorboard=False, console=False)
        return cfg

    assert train(config())["status"] == "completed"
    recorded = RunCheckpointer(tmp_path / "run" / "checkpoints", save_every=2).read_meta(2)["config"]
    assert recorded["data"]["sources"][0]["files"] == shards
    # The folder gains a shard after the run started: resuming from that checkpoint reads the files it recorded.
    storage.write_bytes(f"{gcs_root}/data/text/data-00002-of-00003.array_record", storage.read_bytes(shards[0]))
    resumed = config()
    with caplog.at_level(logging.WARNING, logger="apriel_jax.train.inputs"):
        inputs.resolve_data_files(resumed, recorded)
    assert resumed.data.sources[0]["files"] == shards
    assert "now match 3 files (1 new, 0 gone); reading the 2 files this run started with" in caplog.text


def test_the_15b_recipe_reads_prepared_data_under_its_root(gcs_root):
    from apriel_jax.utils.config_cli import load_config_file

    for name, n in (("text", 3), ("replay", 1)):
        storage.write_bytes(f"{gcs_root}/raw/{name}.jsonl", _jsonl([{"text": f"{name} {i}"} for i in range(n)]))
        prepare_array_record(f"{gcs_root}/raw/{name}.jsonl", f"{gcs_root}/data/{name}", records_per_shard=2)
    cfg = load_config_file(f"{REPO}/configs/pipelines/apriel_15b.py:{gcs_root}/data")
    train = cfg.stages.upscale.train
    validate_train_config(train)
    inputs.resolve_data_files(train)
    files = {s["name"]: s["files"] for s in train.data.sources}
    assert files == {"text": array_record_paths(f"{gcs_root}/data/text"),
                     "replay": array_record_paths(f"{gcs_root}/data/replay")}
    assert len(ArrayRecordSource(files["text"])) == 3
    # A prepare that was interrupted before its manifest (the marker, written last) is refused, not read in part.
    storage.location(f"{gcs_root}/data/replay/manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        inputs.resolve_data_files(train)


# ------------------------------------------------------------------------------------ ArrayRecord


def test_a_vanished_shard_is_retried_then_a_storage_error_naming_it(gcs_root, caplog):
    storage.write_bytes(f"{gcs_root}/in.jsonl", _jsonl([{"text": f"r{i}"} for i in range(4)]))
    prepare_array_record(f"{gcs_root}/in.jsonl", f"{gcs_root}/ar", records_per_shard=2)
    shard = array_record_paths(f"{gcs_root}/ar")[0]
    src = ArrayRecordSource(array_record_paths(f"{gcs_root}/ar"), retries=2, backoff_s=0.01)
    assert src[0]["text"] == "r0"  # the shard is open
    content = storage.read_bytes(shard)
    storage.location(shard).unlink()
    with caplog.at_level(logging.WARNING, logger="apriel_jax.data.sources"):
        with pytest.raises(storage.StorageError, match=rf"{shard}#record 1: unreadable after 3 attempts"):
            src[1]
    assert caplog.text.count("read failed (attempt") == 3
    assert src[2]["text"] == "r2"  # the other shard is unaffected

    # A shard that comes back while the reads are retried is read as if nothing happened.
    patient = ArrayRecordSource(array_record_paths(f"{gcs_root}/ar")[1:], retries=3, backoff_s=0.5)
    assert patient[0]["text"] == "r2"
    other = array_record_paths(f"{gcs_root}/ar")[1]
    other_content = storage.read_bytes(other)
    storage.location(other).unlink()
    restore = threading.Timer(0.2, storage.write_bytes, (other, other_content))
    restore.start()
    try:
        assert patient[1]["text"] == "r3"
    finally:
        restore.join()
    storage.write_bytes(shard, content)


# ------------------------------------------------------------------------------------------ JSONL


def test_the_newline_scan_finds_the_lines_that_line_iteration_finds():
    """Lines split across chunks, blank and whitespace-only lines, a last line without a newline."""
    import random

    from apriel_jax.data.lines import scan_lines

    rng = random.Random(0)
    for _ in range(400):
        data = b"".join(rng.choice([b"a", b" ", b"\n", b"\t", b"{", b"\r"]) for _ in range(rng.randint(0, 40)))
        expected, pos = [], 0
        for number, raw in enumerate(io.BytesIO(data), start=1):
            if raw.strip():
                expected.append((pos, number, raw.rstrip(b"\n")))
            pos += len(raw)
        chunk_bytes = rng.randint(1, 8)
        with_text = [(int(s), int(n), t) for c in scan_lines(io.BytesIO(data), keep_text=True, chunk_bytes=chunk_bytes)
                     for s, n, t in zip(c.starts, c.numbers, c.texts())]
        offsets = [(int(s), int(n), data[s:e]) for c in scan_lines(io.BytesIO(data), chunk_bytes=chunk_bytes)
                   for s, e, n in zip(c.starts, c.ends, c.numbers)]
        assert with_text == offsets == expected, (data, chunk_bytes)



def test_jsonl_in_a_bucket_is_indexed_without_parsing_and_read_by_record(gcs_root, tokenizer_file):
    storage.write_bytes(f"{gcs_root}/chats/imgs/a.png", _png(60, (20, 20)))
    lines = [{"text": "one"}, "", _chat({"type": "image", "path": "imgs/a.png"}, "how many?"), '{"text": ', "  ",
             {"text": "four"}]
    url = f"{gcs_root}/chats/data.jsonl"
    storage.write_bytes(url, _jsonl(lines))
    src = JsonlSource(url, on_error="defer")
    assert len(src) == 4  # blank lines are not records; the bad line is found when read
    assert src[0]["text"] == "one" and src[3]["text"] == "four" and src[3]["_where"] == f"{url}:6"
    with pytest.raises(DataError, match=rf"{url}:4: invalid JSON"):
        src[2]
    with pytest.raises(DataError, match=rf"{url}:4: invalid JSON"):
        JsonlSource(url)  # on_error="raise": every line is parsed up front
    assert len(JsonlSource(url, on_error="skip")) == 3

    chat = pickle.loads(pickle.dumps(src))[1]  # a worker's copy opens its own handle
    assert chat["_dir"] == f"{gcs_root}/chats" and chat["_where"] == f"{url}:3"
    # The relative image path resolves in the bucket, and the image is read from there.
    doc = RecordToDocument(tokenizer_file, patch_budget=64)(chat)
    assert len(doc.images) == 1 and load_image(f"{gcs_root}/chats/imgs/a.png").size == (20, 20)


# ---------------------------------------------------------------------------------------- Parquet


def _write_parquet(path: str, table, row_group_size: int) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    storage.write_bytes(path, buf.getvalue())


def test_parquet_rows_become_records_with_their_images(root):
    import pyarrow as pa

    def turn(role, *parts):
        return {"role": role, "content": [dict(type=t, text=x) for t, x in parts]}

    messages = [
        [turn("user", ("image", None), ("text", "first?"), ("image", None)), turn("assistant", ("text", "a"))],
        [turn("user", ("text", "no placeholders")), turn("assistant", ("text", "b"))],
        [turn("user", ("text", "no images")), turn("assistant", ("text", "c"))],
        [turn("user", ("image", None)), turn("assistant", ("text", "d"))],
    ]
    images = [[{"bytes": _png(1), "path": None}, {"bytes": _png(2), "path": "x.png"}],
              [{"bytes": _png(3), "path": None}, {"bytes": _png(4), "path": None}],
              [],
              [{"bytes": _png(5), "path": None}]]
    _write_parquet(f"{root}/pq/chats-0.parquet", pa.table({"messages": messages, "images": images}), row_group_size=2)
    # The other usual layout: one image as raw bytes in "image", the chat as a JSON string.
    chat = json.dumps([{"role": "user", "content": "describe"}, {"role": "assistant", "content": "grey"}])
    _write_parquet(f"{root}/pq/chats-1.parquet", pa.table({"messages": [chat], "image": [_png(6)], "id": [7]}),
                   row_group_size=1)

    src = ParquetSource(expand_data_paths(f"{root}/pq/*.parquet"))
    assert len(src) == 5
    r0 = src[0]["messages"][0]["content"]
    assert [p["type"] for p in r0] == ["image", "text", "image"] and "text" not in r0[0]
    assert [r0[0]["image"], r0[2]["image"]] == [_png(1), _png(2)]
    assert [p.get("image") for p in src[1]["messages"][0]["content"]] == [_png(3), _png(4), None]  # prepended
    assert src[2]["messages"][0]["content"] == [{"type": "text", "text": "no images"}]
    assert src[3]["_where"] == f"{root}/pq/chats-0.parquet:row 3"  # second row group
    r4 = pickle.loads(pickle.dumps(src))[4]
    assert r4["messages"][0]["content"] == [{"type": "image", "image": _png(6)}, {"type": "text", "text": "describe"}]
    assert r4["_where"] == f"{root}/pq/chats-1.parquet:row 0"

    _write_parquet(f"{root}/pq/text.parquet", pa.table({"body": ["t0", "t1", "t2"]}), row_group_size=2)
    text = ParquetSource([f"{root}/pq/text.parquet"], Columns(text="body"))
    assert [text[i]["text"] for i in (2, 0, 1)] == ["t2", "t0", "t1"]
    with pytest.raises(DataError, match=r"text\.parquet: has neither a 'text' nor a 'messages' column"):
        ParquetSource([f"{root}/pq/text.parquet"])
    wrong = pa.table({"messages": [messages[0]], "images": [images[3]]})
    _write_parquet(f"{root}/pq/wrong.parquet", wrong, row_group_size=1)
    with pytest.raises(DataError, match=r"wrong\.parquet:row 0: the chat has 2 image placeholders but the row has 1"):
        ParquetSource([f"{root}/pq/wrong.parquet"])[0]


def test_a_parquet_source_feeds_training_batches_with_images(gcs_root, tokenizer_file, capsys):
    import pyarrow as pa

    chats = [json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{i}"}]},
                         {"role": "assistant", "content": f"the image shows {i} squares"}]) for i in range(4)]
    _write_parquet(f"{gcs_root}/pq/train.parquet",
                   pa.table({"messages": chats, "image": [{"bytes": _png(i * 40, (16, 16)), "path": None}
                                                          for i in range(4)]}), row_group_size=2)
    cfg = train_config()
    cfg.data.tokenizer = tokenizer_file
    cfg.data.sources = [source("vlm", "parquet", [f"{gcs_root}/pq/*.parquet"], messages_column="messages")]
    cfg.data.update(seq_len=64, patch_budget=8, global_batch=2, loss="responses", chat_format="mistral_instruct")
    validate_train_config(cfg)
    inputs.resolve_data_files(cfg)
    batch = next(iter(inputs.make_dataset(cfg, cfg.data.sources, seed=0)))
    assert (batch["patch_segment_ids"] > 0).sum() == (batch["tokens"] == cfg.model.image_token_id).sum() > 0

    from apriel_jax.cli import main

    assert main(["data", "inspect", f"{gcs_root}/pq/train.parquet", "--tokenizer", tokenizer_file, "--rows", "1",
                 "--seq-len", "64", "--patch-budget", "8", "--format", "mistral_instruct"]) == 0
    shown = capsys.readouterr().out
    assert "| [train, " in shown and "<image 1x1>" in shown


# ------------------------------------------------------------------------------------------- TFDS


def test_tfds_kind_reads_a_builder_with_image_bytes_locally_and_from_the_bucket(tmp_path, gcs_root, tokenizer_file):
    tfds = pytest.importorskip("tensorflow_datasets")

    class AprielTinyVlm(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # Image bytes as a plain tensor: tfds.features.Image would need tensorflow to encode.
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "messages": tfds.features.Text(), "image": tfds.features.Tensor(shape=(), dtype=np.object_)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{i}"}]},
                        {"role": "assistant", "content": f"the image shows {i} squares"}]
                yield i, {"messages": json.dumps(chat), "image": _png(i * 50, (16, 16))}

    builder = AprielTinyVlm(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare()
    local_dir = os.fspath(builder.data_dir)
    remote_dir = f"{gcs_root}/tfds/apriel_tiny_vlm/1.0.0"
    for f in Path(local_dir).iterdir():
        storage.write_bytes(f"{remote_dir}/{f.name}", f.read_bytes())

    for where in (local_dir, remote_dir):
        src = TfdsSource(where, "train")
        assert len(src) == 4
        images = sorted(src[i]["messages"][0]["content"][0]["image"] for i in range(4))
        assert images == sorted(_png(i * 50, (16, 16)) for i in range(4))
    cfg = train_config()
    cfg.data.tokenizer = tokenizer_file
    cfg.data.sources = [source("vlm", "tfds", [remote_dir], split="train")]
    cfg.data.update(seq_len=64, patch_budget=8, global_batch=2, loss="responses", chat_format="mistral_instruct")
    validate_train_config(cfg)
    inputs.resolve_data_files(cfg)  # nothing to expand: a TFDS source names a builder, not files
    assert "files" not in cfg.data.sources[0]
    batch = next(iter(inputs.make_dataset(cfg, cfg.data.sources, seed=0)))
    assert (batch["patch_segment_ids"] > 0).sum() == (batch["tokens"] == cfg.model.image_token_id).sum() > 0


def test_source_entries_are_validated():
    cfg = train_config()
    cfg.data.sources = [source("a", "parquet"), source("b", "tfds", ["x", "y"]),
                        source("c", "parquet", ["f"], colour=1),
                        {"name": "d", "kind": "jsonl", "paths": "one.jsonl"}]
    with pytest.raises(ValueError) as info:
        validate_train_config(cfg)
    text = str(info.value)
    assert "data.sources[0] (parquet) has no paths" in text
    assert "data.sources[1] (tfds) needs paths=[a dataset name or a prepared builder directory]" in text
    assert "data.sources[2] (parquet) has unknown options ['colour']" in text
    assert "data.sources[3].paths must be a list of paths" in text


# -------------------------------------------------------------------------------------- tokenizers


def test_tokenizer_from_the_bucket_is_staged_and_verified(gcs_root, tokenizer_file, tmp_path, monkeypatch):
    monkeypatch.setenv("APRIEL_CACHE_DIR", str(tmp_path / "cache"))
    storage.write_bytes(f"{gcs_root}/ckpt/tokenizer.json", Path(tokenizer_file).read_bytes())
    local = load_tokenizer(tokenizer_file)
    for where in (f"{gcs_root}/ckpt", f"{gcs_root}/ckpt/tokenizer.json"):
        tok = load_tokenizer(where)
        assert tok.encode("the image shows 3 squares") == local.encode("the image shows 3 squares")
    assert list((tmp_path / "cache").rglob("tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer file, nor a folder with tokenizer.json"):
        load_tokenizer(f"{gcs_root}/nothing")
    started = time.perf_counter()
    with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket does not exist"):
        load_tokenizer("gs://no-such-bucket/tok")
    assert time.perf_counter() - started < 60
