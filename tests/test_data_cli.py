"""``apriel-jax data prepare`` / ``data inspect`` on the shipped demo data, in-process through ``main``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from apriel_jax.cli import main
from apriel_jax.data.tokenizer import train_tiny_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "apriel_jax" / "data" / "demo_data"
JSONLS = [str(DEMO / f"{name}.jsonl") for name in ("text", "chat_sft", "multimodal")]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    texts = [json.loads(line)["text"] for line in (DEMO / "text.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tiny_tokenizer(texts, 600, path)
    return str(path)


@pytest.mark.parametrize("argv", [["data", "prepare"], ["data", "inspect"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--help"])
    assert info.value.code == 0
    assert "usage: apriel-jax data" in capsys.readouterr().out


def test_prepare_then_inspect(tmp_path, tok_path, capsys):
    out = tmp_path / "ar"
    assert main(["data", "prepare", *JSONLS, "--out", str(out), "--records-per-shard", "30"]) == 0
    printed = capsys.readouterr().out
    assert "72 records in 3 shard(s)" in printed
    assert printed.count(".array_record: ") == 3

    # Enough rows to hold all 72 records: every kind of record shows up.
    assert main(["data", "inspect", str(out), "--tokenizer", tok_path, "--seq-len", "1024",
                 "--rows", "100", "--loss", "responses"]) == 0
    text = capsys.readouterr().out
    assert "Bread rises because yeast" in text  # text.jsonl
    # A reasoning trace, as a target from its "Here are my reasoning steps:" on (inspect indents lines).
    assert "«Here are my reasoning steps:\n    The job takes 5 × 12 = 60 worker-days." in text
    assert "<image 8x8>" in text  # the 128x128 checkerboard, embedded as base64 by prepare
    assert "checkerboard" in text
    m = re.search(r"packing efficiency over (\d+) rows: tokens (\d+\.\d)% \((\d+)/(\d+)\), patches", text)
    assert m and 0 < float(m.group(2)) <= 100
    assert "records: 72 read, 0 skipped" in text
    assert "2 images downscaled to fit" in text  # house.png and night_boat.png exceed 256 patches


def test_inspect_jsonl_with_pixtral_tokenizer(capsys):
    assert main(["data", "inspect", *JSONLS, "--rows", "2", "--seq-len", "512", "--loss", "all"]) == 0
    text = capsys.readouterr().out
    assert text.count("=== row ") == 2
    assert "| [text, " in text and "| [multimodal, " in text  # sources are read in turn
    assert "<image " in text and "«" in text
    assert "packing efficiency" in text


def test_errors_are_one_line_exit_2(tmp_path, tok_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope.jsonl"), "--tokenizer", tok_path]) == 2
    assert main(["data", "inspect", JSONLS[0], "--tokenizer", tok_path, "--rows", "0"]) == 2
    assert main(["data", "inspect", str(tmp_path), "--tokenizer", tok_path]) == 2  # no manifest.json
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "o"), "--strict"]) == 2
    assert main(["data", "prepare", JSONLS[0], "--out", str(tmp_path / "o"), "--records-per-shard", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("apriel-jax data: error: ") for line in err)
    assert err[3].endswith("bad.jsonl:2: invalid JSON: Expecting value: line 1 column 10 (char 9) [invalid_json]")
    assert not (tmp_path / "o").exists()

    # Without --strict the bad line is skipped, counted by reason, and listed in the manifest.
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "o")]) == 0
    assert "1 bad records skipped (invalid_json 1; listed in " in capsys.readouterr().out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["records"] == 1 and manifest["skipped_reasons"] == {"invalid_json": 1}
    assert manifest["skipped_records"] == [err[3].removeprefix("apriel-jax data: error: ")]
