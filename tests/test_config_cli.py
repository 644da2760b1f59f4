"""Tests for apriel_jax.utils.config_cli."""

from __future__ import annotations

import argparse
import enum
import json
import textwrap

import ml_collections
import pytest
from ml_collections import config_dict

from apriel_jax.utils.config_cli import (
    ConfigOverrideError,
    UnknownConfigKeyError,
    apply_overrides,
    config_from_json,
    config_to_json,
    flatten_keys,
    load_config_file,
    parse_override,
    split_overrides,
)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


def make_cfg() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.use_bf16 = False
    c.name = "run"
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.betas = (0.9, 0.95)
    c.optim.schedule = ml_collections.ConfigDict({"warmup_steps": 100, "kind": "cosine"})
    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 64
    c.model.layer_ids = [0, 1, 2]
    c.model.dropout = None
    c.model.max_len = config_dict.placeholder(int)
    c.model.color = Color.RED
    return c


# ---------------------------------------------------------------------------
# load_config_file
# ---------------------------------------------------------------------------

CONFIG_SRC = textwrap.dedent(
    """
    import dataclasses
    import ml_collections

    @dataclasses.dataclass
    class Thing:  # dataclasses need the module registered in sys.modules
        x: int = 1

    def get_config(variant="base"):
        c = ml_collections.ConfigDict()
        c.variant = variant
        c.size = {"base": 8, "tiny": 2}[variant]
        c.thing_x = Thing().x
        return c
    """
)


def test_load_config_file_default_and_arg(tmp_path):
    p = tmp_path / "my_cfg.py"
    p.write_text(CONFIG_SRC)
    cfg = load_config_file(str(p))
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.variant == "base" and cfg.size == 8 and cfg.thing_x == 1

    tiny = load_config_file(f"{p}:tiny")
    assert tiny.variant == "tiny" and tiny.size == 2
    # Independent objects / independent module imports.
    assert cfg.size == 8


def test_load_config_file_two_files_same_basename(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub, val in (("a", 1), ("b", 2)):
        (tmp_path / sub / "config.py").write_text(
            "import ml_collections\n"
            f"def get_config():\n    return ml_collections.ConfigDict({{'v': {val}}})\n"
        )
    assert load_config_file(str(tmp_path / "a" / "config.py")).v == 1
    assert load_config_file(str(tmp_path / "b" / "config.py")).v == 2


def test_load_config_file_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config_file(str(tmp_path / "nope.py"))
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config_file(str(tmp_path / "nope.py") + ":arg")


def test_load_config_file_missing_get_config(tmp_path):
    p = tmp_path / "no_fn.py"
    p.write_text("X = 1\n")
    with pytest.raises(AttributeError, match="get_config"):
        load_config_file(str(p))


def test_load_config_file_wrong_return_type(tmp_path):
    p = tmp_path / "bad_ret.py"
    p.write_text("def get_config():\n    return {'a': 1}\n")
    with pytest.raises(TypeError, match="dict.*ConfigDict"):
        load_config_file(str(p))


def test_load_config_file_signature_errors(tmp_path):
    no_arg = tmp_path / "no_arg.py"
    no_arg.write_text(
        "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict()\n"
    )
    with pytest.raises(TypeError, match="takes no argument"):
        load_config_file(f"{no_arg}:tiny")

    needs_arg = tmp_path / "needs_arg.py"
    needs_arg.write_text(
        "import ml_collections\ndef get_config(v):\n    return ml_collections.ConfigDict({'v': v})\n"
    )
    with pytest.raises(TypeError, match="requires an argument"):
        load_config_file(str(needs_arg))
    assert load_config_file(f"{needs_arg}:x").v == "x"


# ---------------------------------------------------------------------------
# apply_overrides: types
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [("true", True), ("True", True), ("YES", True), ("1", True),
     ("false", False), ("No", False), ("0", False), ("FALSE", False)],
)
def test_bool_parsing(text, expected):
    cfg = apply_overrides(make_cfg(), [f"--config.use_bf16={text}"])
    assert cfg.use_bf16 is expected


def test_int_float_str_overrides():
    cfg = make_cfg()
    out = apply_overrides(
        cfg,
        [
            "--config.seed=42",
            "config.optim.lr=3e-4",
            "--config.optim.schedule.warmup_steps=-5",
            "--config.name=hello world",
            "--config.model.hidden_size=1_024",
        ],
    )
    assert out is cfg  # in place
    assert cfg.seed == 42 and type(cfg.seed) is int
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.schedule.warmup_steps == -5
    assert cfg.name == "hello world"
    assert cfg.model.hidden_size == 1024


def test_float_field_accepts_int_text():
    cfg = apply_overrides(make_cfg(), ["--config.optim.lr=2"])
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)


def test_str_field_keeps_raw_text():
    cfg = apply_overrides(make_cfg(), ["--config.name=123", "--config.optim.schedule.kind=a=b"])
    assert cfg.name == "123"
    assert cfg.optim.schedule.kind == "a=b"  # split on the first '=' only


def test_sequence_overrides():
    cfg = make_cfg()
    apply_overrides(cfg, ["--config.optim.betas=(0.8, 1)", "--config.model.layer_ids=[3,4]"])
    assert cfg.optim.betas == (0.8, 1.0)
    assert isinstance(cfg.optim.betas, tuple) and isinstance(cfg.optim.betas[1], float)
    assert cfg.model.layer_ids == [3, 4] and isinstance(cfg.model.layer_ids, list)

    apply_overrides(cfg, ["--config.model.layer_ids=7"])
    assert cfg.model.layer_ids == [7]
    apply_overrides(cfg, ["--config.optim.betas=0.5,0.6"])
    assert cfg.optim.betas == (0.5, 0.6)
    apply_overrides(cfg, ["--config.model.layer_ids=[]"])
    assert cfg.model.layer_ids == []


def test_none_field_literal_eval_with_str_fallback():
    cfg = make_cfg()
    apply_overrides(cfg, ["--config.model.dropout=0.1"])
    assert cfg.model.dropout == 0.1
    cfg = make_cfg()
    apply_overrides(cfg, ["--config.model.dropout=some_name"])
    assert cfg.model.dropout == "some_name"
    cfg = make_cfg()
    apply_overrides(cfg, ["--config.model.dropout=[1, 2]"])
    assert cfg.model.dropout == [1, 2]


def test_placeholder_field():
    cfg = make_cfg()
    apply_overrides(cfg, ["--config.model.max_len=128"])
    assert cfg.model.max_len == 128
    with pytest.raises(ConfigOverrideError, match="int"):
        apply_overrides(make_cfg(), ["--config.model.max_len=abc"])
    cfg = make_cfg()
    apply_overrides(cfg, ["--config.model.max_len=None"])
    assert cfg.model.max_len is None


def test_enum_field():
    cfg = apply_overrides(make_cfg(), ["--config.model.color=blue"])
    assert cfg.model.color is Color.BLUE
    with pytest.raises(ConfigOverrideError, match="RED, BLUE"):
        apply_overrides(make_cfg(), ["--config.model.color=green"])


def test_later_override_wins_and_references_follow():
    cfg = make_cfg()
    cfg.model.width = cfg.model.get_ref("hidden_size")
    apply_overrides(cfg, ["--config.model.hidden_size=1", "--config.model.hidden_size=2"])
    assert cfg.model.hidden_size == 2
    assert cfg.model.width == 2


# ---------------------------------------------------------------------------
# apply_overrides: errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,typename",
    [
        ("--config.seed=1.5", "int"),
        ("--config.seed=abc", "int"),
        ("--config.seed=", "int"),
        ("--config.use_bf16=maybe", "bool"),
        ("--config.optim.lr=fast", "float"),
        ("--config.optim.betas=(0.9,", "tuple"),
        ("--config.model.layer_ids={1: 2}", "list"),
    ],
)
def test_parse_failure_names_key_value_and_type(override, typename):
    key, value = parse_override(override)
    with pytest.raises(ValueError) as ei:
        apply_overrides(make_cfg(), [override])
    msg = str(ei.value)
    assert isinstance(ei.value, ConfigOverrideError)
    assert repr(key) in msg
    assert repr(value) in msg
    assert typename in msg


def test_unknown_key_lists_close_matches():
    with pytest.raises(UnknownConfigKeyError) as ei:
        apply_overrides(make_cfg(), ["--config.optim.lrr=1"])
    msg = str(ei.value)
    assert "optim.lrr" in msg and "optim.lr" in msg
    # Catchable as KeyError and as ValueError.
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, ValueError)


def test_unknown_key_misplaced_leaf_suggestion():
    with pytest.raises(KeyError) as ei:
        apply_overrides(make_cfg(), ["--config.warmup_step=1"])
    assert "optim.schedule.warmup_steps" in str(ei.value)


def test_unknown_intermediate_node():
    with pytest.raises(UnknownConfigKeyError, match="optim"):
        apply_overrides(make_cfg(), ["--config.optimizer.lr=1"])
    # Descending into a leaf value.
    with pytest.raises(UnknownConfigKeyError, match="not a nested config"):
        apply_overrides(make_cfg(), ["--config.seed.x=1"])


def test_cannot_override_nested_config_node():
    with pytest.raises(ConfigOverrideError, match="nested config"):
        apply_overrides(make_cfg(), ["--config.optim={'lr': 1}"])


@pytest.mark.parametrize("bad", ["--config.seed", "seed=1", "--config.=1", "--config.a..b=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ValueError):
        apply_overrides(make_cfg(), [bad])


def test_failed_override_leaves_earlier_ones_and_value_intact():
    cfg = make_cfg()
    with pytest.raises(ConfigOverrideError):
        apply_overrides(cfg, ["--config.seed=3", "--config.optim.lr=x"])
    assert cfg.seed == 3
    assert cfg.optim.lr == 1e-3


def test_frozen_config_rejected():
    with pytest.raises(TypeError):
        apply_overrides(config_dict.FrozenConfigDict({"a": 1}), ["--config.a=2"])


def test_flatten_keys():
    keys = flatten_keys(make_cfg())
    assert "optim" in keys and "optim.schedule.warmup_steps" in keys and "seed" in keys


# ---------------------------------------------------------------------------
# split_overrides
# ---------------------------------------------------------------------------


def test_split_overrides_forms():
    argv = [
        "train",
        "--config", "configs/tiny.py:small",
        "--config.seed=1",
        "--config.optim.lr", "5e-4",
        "--config.optim.schedule.warmup_steps", "-1",
        "config.name=abc",
        "--workdir=/tmp/x",
        "--",
        "--config.not_an_override=1",
    ]
    overrides, rest = split_overrides(argv)
    assert overrides == [
        "--config.seed=1",
        "--config.optim.lr=5e-4",
        "--config.optim.schedule.warmup_steps=-1",
        "--config.name=abc",
    ]
    assert rest == [
        "train", "--config", "configs/tiny.py:small", "--workdir=/tmp/x",
        "--", "--config.not_an_override=1",
    ]
    cfg = apply_overrides(make_cfg(), overrides)
    assert (cfg.seed, cfg.optim.lr, cfg.optim.schedule.warmup_steps, cfg.name) == (1, 5e-4, -1, "abc")

    parser = argparse.ArgumentParser()
    parser.add_argument("cmd")
    parser.add_argument("--config")
    parser.add_argument("--workdir")
    args, unknown = parser.parse_known_args(rest)
    assert args.cmd == "train" and args.config == "configs/tiny.py:small"
    assert args.workdir == "/tmp/x"


def test_split_overrides_missing_value():
    with pytest.raises(ConfigOverrideError, match="Missing value"):
        split_overrides(["--config.seed"])
    with pytest.raises(ConfigOverrideError, match="Missing value"):
        split_overrides(["--config.seed", "--other"])


def test_split_overrides_no_overrides():
    assert split_overrides(["a", "--b", "c"]) == ([], ["a", "--b", "c"])
    assert split_overrides([]) == ([], [])


# ---------------------------------------------------------------------------
# JSON round trip
# ---------------------------------------------------------------------------


def test_json_round_trip():
    cfg = ml_collections.ConfigDict()
    cfg.i = 3
    cfg.f = 0.25
    cfg.b = True
    cfg.s = "text"
    cfg.n = None
    cfg.l = [1, 2.5, "x", None, [True, False]]
    cfg.t = (1, 2)
    cfg.nested = ml_collections.ConfigDict({"deeper": {"x": -1, "y": [0.5]}, "z": "q"})

    text = config_to_json(cfg)
    json.loads(text)  # valid JSON
    back = config_from_json(text)
    assert isinstance(back, ml_collections.ConfigDict)
    assert isinstance(back.nested, ml_collections.ConfigDict)
    assert isinstance(back.nested.deeper, ml_collections.ConfigDict)
    assert back.i == 3 and type(back.i) is int
    assert back.f == 0.25 and back.b is True and back.s == "text" and back.n is None
    assert back.l == [1, 2.5, "x", None, [True, False]]
    assert back.t == [1, 2]  # documented: tuples come back as lists
    assert back.nested.deeper.x == -1 and back.nested.deeper.y == [0.5]

    expected = cfg.to_dict()
    expected["t"] = list(expected["t"])
    assert back.to_dict() == expected
    # Stable under a second round trip.
    assert config_to_json(back) == config_to_json(config_from_json(config_to_json(back)))


def test_json_round_trip_then_override():
    back = config_from_json(config_to_json(make_cfg_json_safe()))
    apply_overrides(back, ["--config.optim.lr=0.5", "--config.use_bf16=yes"])
    assert back.optim.lr == 0.5 and back.use_bf16 is True


def make_cfg_json_safe() -> ml_collections.ConfigDict:
    cfg = make_cfg()
    del cfg.model["color"]
    return cfg


def test_json_errors():
    with pytest.raises(ValueError, match="object"):
        config_from_json("[1, 2]")
    cfg = ml_collections.ConfigDict({"obj": object()})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        config_to_json(cfg)
    with pytest.raises(TypeError):
        config_to_json({"a": 1})  # type: ignore[arg-type]


def test_unknown_key_prefix_of_existing_leaf():
    with pytest.raises(UnknownConfigKeyError) as ei:
        apply_overrides(make_cfg(), ["--config.warmup=1"])
    assert "optim.schedule.warmup_steps" in str(ei.value)
    with pytest.raises(UnknownConfigKeyError, match="No similar keys"):
        apply_overrides(make_cfg(), ["--config.qqqqqq=1"])
