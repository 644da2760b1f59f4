"""One record validator for `data inspect`, `data prepare` and training: every malformed record is a counted skip
naming file:line and its reason, or (strict) one line; nothing is lost, nothing silently trained on.

The issue-11 cases: (1) a failed prepare never touches an existing output; (2) malformed chats ("messages" a
string, content a number, role a number, a text part without text); (3) an empty conversation, a LLaVA record
(now converted); (7) an image "path" that is a number.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apriel_jax.cli import main
from apriel_jax.data.errors import REASONS, DataError, InvalidRecord
from apriel_jax.data.packing import PackingConfig
from apriel_jax.data.pipeline import build_dataset, merge_row_states, select_row_state
from apriel_jax.data.records import RecordToDocument
from apriel_jax.data.sources import JsonlSource, prepare_array_record
from apriel_jax.data.validate import check_record
from apriel_jax.train import inputs
from apriel_jax.train.config import source, train_config, validate_train_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "apriel_jax" / "data" / "demo_data"
TOKENIZER = str(DEMO / "tokenizer.json")


def _png(colour=(200, 40, 40), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def chat(user, answer="An answer.") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# The bad records of issue 11, each with the reason and the message it must give (after "file:line: ").
ISSUE_CASES = {
    "messages_a_string": ({"messages": "hello"}, "bad_schema", "'messages' must be a list of turns, got 'hello' (str)"),
    "content_a_number": (chat(5), "bad_schema",
                         "message 0: 'content' must be a string or a list of parts, got 5 (int)"),
    "role_a_number": ({"messages": [{"role": 5, "content": "hi"}, {"role": "assistant", "content": "a"}]}, "bad_schema",
                      "message 0: 'role' must be one of system, user, assistant, tool, got 5 (int)"),
    "text_part_without_text": (chat([{"type": "text"}]), "bad_schema",
                               "message 0, part 0: a text part needs a string 'text', it has none"),
    "empty_conversation": ({"messages": []}, "empty_conversation", "the conversation has no user or assistant turn"),
    "only_a_system_turn": ({"messages": [{"role": "system", "content": "Be kind."}]}, "empty_conversation",
                           "the conversation has no user or assistant turn"),
    "image_path_a_number": (chat([{"type": "image", "path": 5}]), "bad_schema",
                            "message 0, part 0: image 'path' must be a string, got int"),
    "missing_image": (chat([{"type": "image", "path": "nowhere.png"}]), "unreadable_image", "cannot read image "),
    "llava_with_too_few_images": ({"conversations": [{"from": "human", "value": "<image> vs <image>"},
                                                     {"from": "gpt", "value": "same"}], "image": "ok.png"},
                                  "image_count_mismatch", "the chat has 2 image placeholders"),
    "not_json": ('{"messages": [', "invalid_json", "invalid JSON: "),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("records")
    (root / "ok.png").write_bytes(_png())
    (root / "broken.png").write_bytes(_png()[:40])
    return root


# --------------------------------------------------------------------------------------------- validator


@pytest.mark.parametrize("record, reason, message", [
    *ISSUE_CASES.values(),
    ({"text": 5}, "bad_schema", "'text' must be a string, got 5 (int)"),
    ({"text": " \n"}, "empty_text", "the text is empty"),
    ({"title": "no record keys"}, "bad_schema", "a record must be a JSON object with 'text', 'messages' or "
                                                "'conversations'"),
    ("[1, 2]", "bad_schema", "a record must be a JSON object"),
    (chat([{"type": "video", "path": "v.mp4"}]), "bad_schema", "message 0, part 0 must be {'type': 'text' | 'image'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn",
     "the conversation has no assistant turn: with the loss on responses"),
    ({"messages": ["hi"]}, "bad_schema", "message 0 must be an object with 'role' and 'content', got 'hi' (str)"),
    ({"messages": [{"role": "human", "content": "q"}]}, "bad_schema",
     "message 0: 'role' must be one of system, user, assistant, tool, got 'human' (str)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}, "bad_schema",
     "message 1: system messages must come before all others"),
    (chat([{"type": "image", "path": "a.png", "image_base64": "AAAA"}]), "bad_schema",
     "message 0, part 0: an image part names its image once, got ['path', 'image_base64']"),
    (chat([{"type": "image"}]), "image_count_mismatch", "the chat has 1 image placeholders"),
    (chat([{"type": "image", "path": None}]), "bad_schema",
     "message 0, part 0: an image part needs 'path', 'image' or 'image_base64'"),
    (chat([{"type": "image", "path": "https://x.org/a.png"}]), "remote_image_url",
     "message 0, part 0: image 'path' is a remote URL (https://x.org/a.png): nothing is fetched"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "image", "path": "a.png"}]}]}, "bad_schema",
     "message 1, part 0: images are only supported in user turns, not assistant"),
    ({"messages": [{"role": "user", "content": "q", "reasoning": "r"}, {"role": "assistant", "content": "a"}]},
     "bad_schema", "message 0: only assistant turns have 'reasoning' or 'tool_calls'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": 3}]},
     "bad_schema", "message 1: 'reasoning' must be a string, got 3 (int)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"arguments": {}}]}]},
     "bad_schema", "message 1, tool call 0 needs a 'name'"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{oops"}]}]},
     "bad_schema", "message 1, tool call 0 (f): 'arguments' is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": {"name": "f"}}]},
     "bad_schema", "message 1: 'tool_calls' must be a list"),
    ({**chat("q"), "tools": {"name": "f"}}, "bad_schema", "'tools' must be a list of objects"),
])
def test_each_malformed_record_is_one_line_with_its_place_and_reason(record, reason, message, data_dir):
    with pytest.raises(InvalidRecord) as info:
        raw = record if isinstance(record, str) else json.dumps(record)
        parsed = JsonlSource(write_jsonl(data_dir / "one.jsonl", [raw]), on_error="defer")[0]
        RecordToDocument(TOKENIZER, on_invalid="error", loss="responses")(parsed)
    err = info.value
    assert err.reason == reason and reason in REASONS
    assert str(err).startswith(f"{data_dir / 'one.jsonl'}:1: {message}")
    assert str(err).endswith(f" [{reason}]") and "\n" not in str(err)
    again = pickle.loads(pickle.dumps(err))  # as grain re-raises it from a worker process
    assert (type(again), str(again), again.reason) == (InvalidRecord, str(err), reason)


def test_valid_records_pass_and_only_the_loss_decides_about_answers():
    for name in ("text", "chat_sft", "multimodal"):
        for record in JsonlSource(DEMO / f"{name}.jsonl"):
            assert check_record(record, loss="responses")["_where"] == record["_where"]
    question = {"messages": [{"role": "user", "content": "q"}], "_where": "q.jsonl:1"}
    assert check_record(question, loss="all") == question and check_record(question) == question
    calls = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "content": "1"}]}
    assert check_record(calls, loss="responses") == calls
    with pytest.raises(InvalidRecord, match=r"mistral_instruct format has no tools or reasoning \[bad_schema\]"):
        check_record(calls, mode="mistral_instruct")


def _mutations(node, path=()):
    """(path, replacement) for every value of a JSON record: other types, and (in objects) removal."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,), "<delete>"
            yield from _mutations(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _mutations(v, path + (i,))
    for other in (5, None, "x", [], {}, [{}], 1.5):
        if path and type(other) is not type(node):
            yield path, other


def _mutated(record, path, value):
    out = copy.deepcopy(record)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value == "<delete>":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def test_no_mutation_of_a_valid_record_reaches_tokenization_unchecked():
    """Whatever value replaces any field of real records, conversion gives a document or a counted skip, never
    a TypeError/KeyError/ValueError from deep inside the chat format."""
    chats = [JsonlSource(DEMO / "chat_sft.jsonl")[i] for i in (0, 16)] + [JsonlSource(DEMO / "multimodal.jsonl")[0]]
    assert chats[1].get("tools") and any(m.get("reasoning") for m in chats[0]["messages"])
    place = {"_where": "foreign.jsonl:1", "_dir": str(DEMO)}
    chats.append({**place, "images": ["images/red_circle.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."}]})
    chats.append({**place, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/red_circle.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "Done."}]})
    conv = RecordToDocument(TOKENIZER, patch_budget=64)
    tried = 0
    for record in chats:
        for path, value in _mutations({k: v for k, v in record.items() if not k.startswith("_")}):
            mutated = {**_mutated(record, path, value), "_where": record["_where"], "_dir": record["_dir"]}
            doc = conv(mutated)
            assert len(doc) > 0 or doc.skip_reason, (path, value)
            tried += 1
    assert tried > 500 and conv.skips.counts["bad_schema"] > 100 and conv.records == tried


# ------------------------------------------------------------------------------------- data inspect (CLI)


def _bad_file(data_dir: Path, name: str, bad) -> Path:
    return write_jsonl(data_dir / f"{name}.jsonl", [chat("good question"), bad, {"text": "good text"}])


@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_inspect_and_prepare_skip_or_stop_naming_file_line_and_reason(case, data_dir, tmp_path, capsys, caplog):
    bad, reason, message = ISSUE_CASES[case]
    path = _bad_file(data_dir, case, bad)
    expected = f"{path}:2: {message}"
    with caplog.at_level(logging.WARNING, logger="apriel_jax.data.validate"):
        assert main(["data", "inspect", str(path), "--tokenizer", TOKENIZER, "--rows", "5"]) == 0
    out = capsys.readouterr().out
    assert f"records: 3 read, 1 skipped ({reason} 1)" in out and "good question" in out and "good text" in out
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith(f"skipped {expected}")
    assert caplog.records[0].getMessage().endswith(f"[{reason}]")

    assert main(["data", "inspect", str(path), "--tokenizer", TOKENIZER, "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"apriel-jax data: error: {expected}") and err[0].endswith(f"[{reason}]")

    out_dir = tmp_path / "ar"
    assert main(["data", "prepare", str(path), "--out", str(out_dir), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"apriel-jax data: error: {expected}")
    assert not out_dir.exists() and os.listdir(tmp_path) == []  # nothing written, no partial left

    assert main(["data", "prepare", str(path), "--out", str(out_dir)]) == 0
    assert f"2 records in 1 shard(s), 1 bad records skipped ({reason} 1;" in capsys.readouterr().out
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["skipped_reasons"] == {reason: 1} and manifest["skipped_records"][0].startswith(expected)


def test_a_llava_record_is_trained_with_its_image_not_as_text(data_dir, capsys):
    llava = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                                  {"from": "gpt", "value": "Red."}]}
    path = write_jsonl(data_dir / "llava.jsonl", [llava])
    assert main(["data", "inspect", str(path), "--tokenizer", TOKENIZER]) == 0
    out = capsys.readouterr().out
    assert "<image 2x2>What colour is it?" in out and "<image>" not in out and "records: 1 read, 0 skipped" in out


def test_an_undecodable_image_is_a_bad_image_at_prepare_time(data_dir, tmp_path):
    path = write_jsonl(data_dir / "broken.jsonl", [chat([{"type": "image", "path": "ok.png"}]),
                                                   chat([{"type": "image", "path": "broken.png"}])])
    manifest = prepare_array_record(str(path), str(tmp_path / "ar"), on_invalid="skip")
    assert manifest["records"] == 1 and manifest["skipped_reasons"] == {"bad_image": 1}
    assert manifest["skipped_records"][0].startswith(f"{path}:2: message 0, part 0 (")
    with pytest.raises(InvalidRecord, match=rf"^{path}:2: .*cannot decode image.*\[bad_image\]$"):
        prepare_array_record(str(path), str(tmp_path / "other"))


# ------------------------------------------------------------------------------------ data prepare: no loss


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_prepare_never_touches_the_existing_output(data_dir, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [chat(f"question {i}") for i in range(12)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("q1"), chat("q2"), chat([{"type": "image", "path": "gone.png"}])]
                      + [chat(f"q{i}") for i in range(4, 12)])
    out = tmp_path / "D"
    assert main(["data", "prepare", str(good), "--out", str(out)]) == 0
    before = _tree(out)
    assert json.loads(before["manifest.json"])["records"] == 12

    # Issue 11 case 1: preparing again into D must not touch it, whatever the input.
    assert main(["data", "prepare", str(bad), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["data", "prepare", str(bad), "--out", str(out), "--overwrite", "--strict"]) == 2
    assert f"bad.jsonl:3: cannot read image {tmp_path}/gone.png" in capsys.readouterr().err
    assert _tree(out) == before and sorted(os.listdir(tmp_path)) == ["D", "bad.jsonl", "good.jsonl"]
    assert main(["data", "inspect", str(out), "--tokenizer", TOKENIZER, "--rows", "100"]) == 0
    assert "records: 12 read, 0 skipped" in capsys.readouterr().out

    # --overwrite replaces it whole, without the bad record.
    assert main(["data", "prepare", str(bad), "--out", str(out), "--overwrite"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 10 and manifest["skipped_reasons"] == {"unreadable_image": 1}
    assert sorted(os.listdir(out)) == ["data-00000-of-00001.array_record", "manifest.json"]


def _prepare_command(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "apriel_jax.cli", "data", "prepare", str(src), "--out", str(out),
            "--records-per-shard", "500"]


def test_prepare_killed_mid_write_then_rerun_gives_the_uninterrupted_shards(tmp_path):
    (tmp_path / "img.png").write_bytes(_png((10, 200, 10), (48, 40)))
    records = [{"text": f"record {i}: " + "lorem ipsum dolor sit amet " * 6} if i % 100
               else chat([{"type": "image", "path": "img.png"}, {"type": "text", "text": f"image {i}"}])
               for i in range(30_000)]
    records[777] = {"messages": "not a chat"}  # skipped, the same way in every run
    src = write_jsonl(tmp_path / "in.jsonl", records)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = tmp_path / "reference"
    subprocess.run(_prepare_command(src, reference), check=True, env=env, capture_output=True)

    out = tmp_path / "out"
    partial = tmp_path / ".out.partial"
    proc = subprocess.Popen(_prepare_command(src, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_dir() and len(list(partial.glob("*.array_record"))) >= 3:  # writing shards
            break
        time.sleep(0.002)
    assert proc.poll() is None, "prepare finished before it could be killed; make the input larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing was published: readers see no directory at all
    assert main(["data", "inspect", str(out), "--tokenizer", TOKENIZER]) == 2

    subprocess.run(_prepare_command(src, out), check=True, env=env, capture_output=True)
    assert not partial.exists()
    shards = _tree(out)
    assert shards == _tree(reference) and len(shards) == 61  # 60 shards + manifest, byte for byte
    manifest = json.loads(shards["manifest.json"])
    assert manifest["records"] == 29_999 and manifest["skipped_reasons"] == {"bad_schema": 1}


# ---------------------------------------------------------------------------- training: counted, resumable


class _Recording:
    """A source that records which records were read (in this process)."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.read.append(int(index))
        return self.source[index]


@pytest.fixture(scope="module")
def mixed_jsonl(tmp_path_factory, data_dir) -> tuple[Path, dict[int, str]]:
    """40 good chats and text records with a bad one of several reasons every 8 records."""
    lines, bad = [], {}
    reasons = ["bad_schema", "invalid_json", "empty_conversation", "unreadable_image", "no_assistant_turn"]
    for i in range(40):
        if i % 8 == 3:
            reason = reasons[len(bad) % len(reasons)]
            bad[len(lines)] = reason
            lines.append({"bad_schema": chat(7), "invalid_json": '{"text": ', "empty_conversation": {"messages": []},
                          "unreadable_image": chat([{"type": "image", "path": "lost.png"}]),
                          "no_assistant_turn": {"messages": [{"role": "user", "content": "q"}]}}[reason])
        lines.append(chat(f"question {i}", f"answer {i}") if i % 2 else {"text": f"plain text number {i}"})
    return write_jsonl(data_dir / "mixed.jsonl", lines), bad


def _dataset(path, **kwargs):
    conv = RecordToDocument(TOKENIZER, loss="responses", on_invalid=kwargs.pop("on_invalid", "skip"))
    cfg = PackingConfig(seq_len=96, patch_budget=0, pad_id=11)
    src = _Recording(JsonlSource(path, on_error="defer"))
    return src, build_dataset({"mixed": (src, 1.0)}, conv, cfg, global_batch=4, seed=3,
                              on_invalid=conv.on_invalid, **kwargs)


def test_training_skips_bad_lines_and_counts_them_per_reason(mixed_jsonl, caplog):
    path, bad = mixed_jsonl
    src, ds = _dataset(path)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="apriel_jax.data.validate"):
        batches = [next(it) for _ in range(12)]
    assert all(b["tokens"].shape == (4, 96) for b in batches)
    health = inputs.data_health(it)
    expected = Counter(bad[i] for i in src.read if i in bad)
    assert len(expected) == 5  # every reason was met
    assert health["records"] == len(src.read) == it.stats.records
    assert {k: v for k, v in health.items() if k.startswith("skipped/") and v} == {
        f"skipped/{r}": float(n) for r, n in expected.items()}
    assert set(health) == {"records", "skip_fraction", *(f"skipped/{r}" for r in REASONS)}
    assert health["skip_fraction"] == pytest.approx(sum(expected.values()) / len(src.read))
    assert inputs.skip_summary(health) == (f"{len(src.read)} records read, {sum(expected.values())} skipped "
                                           f"({health['skip_fraction']:.2%}): " + ", ".join(
                                               f"{r} {expected[r]}" for r in REASONS if expected[r]))
    # Each reason is logged a few times with its file:line, then only counted.
    logged = Counter(r.getMessage().rsplit("[", 1)[1].split("]")[0] for r in caplog.records)
    assert all(0 < logged[r] <= 3 for r in expected) and all(f"{path}:" in r.getMessage() for r in caplog.records)

    # The counts are part of the iterator's state: a resumed iterator continues them (and skips the same records).
    state = json.loads(json.dumps(it.get_state()))
    more = [next(it) for _ in range(4)]
    resumed = iter(_dataset(path)[1])
    resumed.set_state(state)
    for a, b in zip(more, [next(resumed) for _ in range(4)]):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert inputs.data_health(resumed) == inputs.data_health(it)


def test_skip_counts_cross_worker_processes(mixed_jsonl):
    path, _ = mixed_jsonl
    it = iter(_dataset(path)[1])
    for _ in range(6):
        next(it)
    workers = iter(_dataset(path, worker_count=1)[1])
    try:
        for _ in range(6):
            next(workers)
        assert inputs.data_health(workers) == inputs.data_health(it) and it.stats.records > 0
    finally:
        workers.close()


def test_strict_training_stops_at_the_first_bad_record_with_its_line(mixed_jsonl):
    path, bad = mixed_jsonl
    it = iter(_dataset(path, on_invalid="error")[1])
    with pytest.raises(InvalidRecord) as info:
        for _ in range(20):
            next(it)
    assert str(info.value).startswith(f"{path}:") and "\n" not in str(info.value)
    line = int(str(info.value).split(":")[1])
    assert bad[line - 1] == info.value.reason


def test_the_skip_fraction_stops_a_run_only_past_its_threshold_and_minimum():
    cfg = train_config()
    health = {"records": 2000.0, **{f"skipped/{r}": 0.0 for r in REASONS}, "skip_fraction": 0.05}
    health.update({"skipped/bad_schema": 60.0, "skipped/unreadable_image": 40.0})
    with pytest.raises(DataError) as info:
        inputs.check_skip_fraction(cfg, health)
    assert str(info.value) == ("100 of the 2000 records read were skipped (5.0%, more than "
                               "data.max_skip_fraction=0.01): bad_schema 60, unreadable_image 40; the warnings "
                               "name the first records of each reason; fix the data, or raise data.max_skip_fraction")
    cfg.data.max_skip_fraction = 0.05
    inputs.check_skip_fraction(cfg, health)  # at the threshold: goes on
    cfg.data.max_skip_fraction, cfg.data.skip_check_after = 0.01, 2001
    inputs.check_skip_fraction(cfg, health)  # too few records read yet
    cfg.data.skip_check_after = 0
    cfg.data.max_skip_fraction = 1.0
    inputs.check_skip_fraction(cfg, {**health, "skip_fraction": 1.0})  # 1.0: never stops


def test_make_dataset_takes_the_policy_from_the_run_config(mixed_jsonl):
    path, _ = mixed_jsonl
    cfg = train_config()
    cfg.data.sources = [source("mixed", "jsonl", [str(path)])]
    cfg.data.tokenizer, cfg.data.loss, cfg.data.seq_len, cfg.data.global_batch = TOKENIZER, "responses", 96, 4
    validate_train_config(cfg)
    inputs.resolve_data_files(cfg)
    it = iter(inputs.make_dataset(cfg, cfg.data.sources, seed=0))
    for _ in range(8):
        next(it)
    health = inputs.data_health(it, rows=[0, 1, 2, 3])  # one process: the same as its own counts
    assert health == inputs.data_health(it) and health["skip_fraction"] > 0.1
    with pytest.raises(DataError, match=r"records read were skipped"):
        inputs.check_skip_fraction(cfg, {**health, "records": 5000.0})
    cfg.data.on_invalid = "error"
    with pytest.raises(InvalidRecord):
        strict = iter(inputs.make_dataset(cfg, cfg.data.sources, seed=0))
        for _ in range(8):
            next(strict)


def test_record_counts_merge_and_split_across_process_layouts(mixed_jsonl):
    path, _ = mixed_jsonl
    halves = []
    for rows in ([0, 1], [2, 3]):
        it = iter(_dataset(path, row_ids=rows)[1])
        for _ in range(5):
            next(it)
        halves.append((rows, it.get_state(), it.stats))
    merged = merge_row_states([(rows, state) for rows, state, _ in halves], 4)
    records = merged["stats"]["records"]
    assert records["read"] == sum(s.records for _, _, s in halves) > 0
    assert records["skipped"] == {r: sum(s.skipped[r] for _, _, s in halves) for r in REASONS}
    assert sum(records["skipped"].values()) > 0
    assert select_row_state(merged, [0, 1])["stats"]["records"] == records
    assert select_row_state(merged, [2, 3])["stats"]["records"] == {"read": 0, "skipped": dict.fromkeys(REASONS, 0)}
    old = copy.deepcopy(merged)  # a state saved before records were counted restores with zero counts
    del old["stats"]["records"]
    it = iter(_dataset(path)[1])
    it.set_state(old)
    assert it.stats.records == 0 and not any(it.stats.skipped.values())


# ------------------------------------------------------------------------------------------- run config


def test_data_settings_are_checked_before_a_run():
    cfg = train_config()
    cfg.data.on_invalid = "ignore"
    cfg.data.max_skip_fraction = float("nan")
    cfg.data.skip_check_after = -1
    cfg.data.loss = "answers"
    cfg.data.sources = [source("a", "bytes_text", weight=float("nan")), source("b", "bytes_text", weight=0.0)]
    with pytest.raises(ValueError) as info:
        validate_train_config(cfg)
    text = str(info.value)
    for problem in ("data.on_invalid='ignore' is not one of ('skip', 'error')",
                    "data.max_skip_fraction=nan must be in [0, 1] (1: never stop)",
                    "data.skip_check_after=-1 must be >= 0", "data.loss='answers'",
                    "data.sources[0].weight=nan must be a positive finite number",
                    "data.sources[1].weight=0.0 must be a positive finite number"):
        assert problem in text
    cfg = train_config()
    cfg.data.max_skip_fraction = 1.5
    with pytest.raises(ValueError, match=r"data.max_skip_fraction=1.5 must be in \[0, 1\]"):
        validate_train_config(cfg)
