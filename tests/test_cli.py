"""The apriel-jax command line, called in-process through ``main``."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apriel_jax.cli import main
from apriel_jax.checkpoint.safetensors_io import SafetensorsCheckpoint

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_TEXT = ["a small tokenizer for the tiny checkpoint", "describe the picture in one sentence"] * 3


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An HF export of a random tiny model, with a trained tokenizer.json beside the weights."""
    from flax import nnx

    from apriel_jax.checkpoint.hf_export import export_hf
    from apriel_jax.data.tokenizer import train_tiny_tokenizer
    from apriel_jax.model import create_model, get_preset

    root = tmp_path_factory.mktemp("ckpt")
    cfg = get_preset("tiny")
    train_tiny_tokenizer(TOKENIZER_TEXT, cfg.decoder.vocab_size, root / "tok")
    return export_hf(nnx.state(create_model(cfg, seed=1)), cfg, root / "hf", source_dir=root / "tok")


def _tensors(path):
    ckpt = SafetensorsCheckpoint(path)
    try:
        return {name: np.array(ckpt.get(name)) for name in ckpt.keys()}
    finally:
        ckpt.close()


@pytest.mark.parametrize("argv", [
    [], ["demo"], ["convert"], ["convert", "hf-to-orbax"], ["convert", "orbax-to-hf"],
    ["convert", "mistral-to-hf"], ["convert", "hf-to-mistral"], ["generate"], ["pipeline"], ["aot"], ["train"],
    ["plot"], ["data"],
])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--help"])
    assert info.value.code == 0
    assert "usage: apriel-jax" in capsys.readouterr().out


def test_subcommands_that_need_arguments_say_so(capsys):
    for name in ("train", "aot", "data"):
        with pytest.raises(SystemExit) as info:
            main([name])
        assert info.value.code == 2
    capsys.readouterr()


def test_pipeline_plan_without_config_is_the_demo(capsys):
    assert main(["pipeline", "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pipeline demo:") and "\ncpt2 " in out and "\nmerge " in out
    assert main(["pipeline", "--only", "nope"]) == 2
    assert "'nope' is not a stage" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["demo", "--config", str(REPO / "configs" / "quickstart.py"),
                 f"--config.out_dir={out}", "--config.max_new_tokens", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    for step in ("tokenizer", "create sharded model", "forward pass", "HF export + re-import",
                 "HF -> orbax -> HF", "transformers parity", "greedy generate", "total"):
        assert step in printed
    assert "FAILED" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["generated_ids"]) <= 4 and summary["devices"] >= 1
    assert summary["transformers_max_rel_error"] is None or summary["transformers_max_rel_error"] < 1e-4
    assert (out / "hf" / "tokenizer.json").is_file() and (out / "hf_roundtrip" / "config.json").is_file()


def test_demo_bad_override_is_a_usage_error(capsys):
    assert main(["demo", "--config.not_a_field=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not_a_field" in err


def test_convert_round_trips(tiny_checkpoint, tmp_path, capsys):
    original = _tensors(tiny_checkpoint)
    steps = [
        ("hf-to-orbax", tiny_checkpoint, tmp_path / "orbax", []),
        ("orbax-to-hf", tmp_path / "orbax", tmp_path / "hf2", ["--max-shard-size", "300KB"]),
        ("hf-to-mistral", tmp_path / "hf2", tmp_path / "mistral", []),
        ("mistral-to-hf", tmp_path / "mistral", tmp_path / "hf3", []),
    ]
    for kind, src, dst, extra in steps:
        assert main(["convert", kind, str(src), str(dst), *extra]) == 0
        assert f"{kind}: wrote {dst}" in capsys.readouterr().out
    assert len(list((tmp_path / "hf2").glob("model-*.safetensors"))) > 1  # the shard size was honoured
    assert (tmp_path / "mistral" / "consolidated.safetensors").is_file()
    for out in ("hf2", "hf3"):
        again = _tensors(tmp_path / out)
        assert again.keys() == original.keys()
        for name, value in original.items():
            assert again[name].dtype == value.dtype and again[name].tobytes() == value.tobytes(), name
    assert (tmp_path / "hf2" / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()

    # An existing output is refused unless --overwrite.
    assert main(["convert", "hf-to-orbax", str(tiny_checkpoint), str(tmp_path / "orbax")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "hf-to-orbax", str(tiny_checkpoint), str(tmp_path / "orbax"), "--overwrite",
                 "--param-dtype", "bfloat16"]) == 0


def test_generate_with_image(tiny_checkpoint, tmp_path, capsys):
    import jax

    from apriel_jax.checkpoint.pretrained import from_pretrained
    from apriel_jax.data.images import ImageConfig, load_image
    from apriel_jax.data.prompt import encode_prompt, prompt_batch
    from apriel_jax.data.tokenizer import load_tokenizer
    from apriel_jax.model.generate import SamplingConfig, generate

    rng = np.random.default_rng(0)
    image_path = tmp_path / "cat.png"
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(image_path)
    argv = ["generate", "--checkpoint", str(tiny_checkpoint), "--image", str(image_path),
            "--prompt", "describe the picture", "--max-new-tokens", "5"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "1 image(s)" in captured.err

    # The same request through the Python API gives the same greedy text.
    tok = load_tokenizer(tiny_checkpoint)
    ids, images = encode_prompt([load_image(image_path), "describe the picture"], tok, ImageConfig(longest_edge=256))
    batch = prompt_batch([(ids, images)], pad_id=tok.pad_id, image_id=tok.image_id)

    def greedy_text(model):
        new, _ = generate(model, batch, SamplingConfig(max_new_tokens=5, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id),
                          rng=jax.random.key(0))
        new = np.asarray(new)[0].tolist()
        return tok.decode(new[: new.index(tok.eos_id)] if tok.eos_id in new else new) + "\n"

    assert captured.out == greedy_text(from_pretrained(tiny_checkpoint))

    # --quant int8 --quant-embeddings: the model loaded with its projections, embedding and LM head quantized,
    # as from_pretrained gives it.
    assert main([*argv, "--quant", "int8", "--quant-embeddings"]) == 0
    assert capsys.readouterr().out == greedy_text(from_pretrained(tiny_checkpoint, quant="int8", quant_embeddings=True))
    assert main([*argv, "--quant-embeddings"]) == 2  # without --quant: nothing to quantize them with
    assert "--quant-embeddings goes with --quant int8 or int4" in capsys.readouterr().err
    # An int4 group that does not divide the projections' inputs: one line, exit 2.
    assert main([*argv, "--quant", "int4", "--group-size", "7"]) == 2
    assert "group_size=7" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "no_tokenizer"])
def test_bad_checkpoint_is_one_line_exit_2(case, tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    if case != "missing":
        bad.mkdir()
    if case in ("truncated", "no_tokenizer"):
        (bad / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
        weights = (tiny_checkpoint / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(weights if case == "no_tokenizer" else weights[: len(weights) // 2])
    if case == "truncated":
        (bad / "tokenizer.json").write_bytes((tiny_checkpoint / "tokenizer.json").read_bytes())

    assert main(["convert", "hf-to-orbax", str(bad), str(tmp_path / "out")]) == (0 if case == "no_tokenizer" else 2)
    assert main(["generate", "--checkpoint", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("apriel-jax ") and ": error: " in line for line in err)
    assert "Traceback" not in "\n".join(err)


def test_debug_flag_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.delenv("APRIEL_DEBUG", raising=False)  # --debug sets it for the process: undone after the test
    with pytest.raises(FileNotFoundError):
        main(["--debug", "generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"])
    with pytest.raises(FileNotFoundError):
        main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi", "--debug"])


def test_generate_bad_sampling_settings(tiny_checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
