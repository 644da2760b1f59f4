"""Loading ``ml_collections`` config files and applying command-line overrides.

This is a small, dependency-free (besides ``ml_collections``) replacement for
``ml_collections.config_flags`` that works with plain ``argparse``:

    overrides, rest = split_overrides(sys.argv[1:])
    args = parser.parse_args(rest)
    cfg = load_config_file(args.config)          # "configs/foo.py[:arg]"
    cfg = apply_overrides(cfg, overrides)         # "--config.a.b=VALUE", ...

Override syntax
---------------
``--config.a.b.c=VALUE`` or ``config.a.b.c=VALUE``; in an argv list also
``--config.a.b.c VALUE`` (see :func:`split_overrides`).  The dotted key must
already exist in the config, and VALUE is parsed according to the type of the
existing field:

* ``bool``: ``true/false/1/0/yes/no/on/off`` (case-insensitive);
* ``int``: Python int literal (``3``, ``-1``, ``1_000``, ``0x10``);
* ``float``: anything ``float()`` accepts (``1e-4``, ``3``, ``inf``);
* ``str``: the raw text, unchanged;
* ``tuple``/``list``: a Python literal via ``ast.literal_eval`` (``(1, 2)``,
  ``[1,2]``, ``1,2``; a single scalar becomes a 1-element sequence); the
  result is converted to the field's container type, and ints are promoted to
  floats when the existing elements are all floats;
* ``None``-valued fields: ``ast.literal_eval``, falling back to the raw string;
* ``ml_collections.config_dict.placeholder(T)`` fields: parsed as ``T``
  (``none``/``None`` resets them to ``None``);
* ``enum.Enum`` subclasses: by member name (or value).

Nested ``ConfigDict`` nodes cannot be overridden as a whole: override leaves.

JSON
----
:func:`config_to_json` / :func:`config_from_json` round-trip nested
ConfigDicts holding ints, floats, bools, strings, lists and None.  JSON has no
tuple type, so **tuples come back as lists**; ``FieldReference`` links are
resolved to their current values.
"""

from __future__ import annotations

import ast
import difflib
import enum
import importlib.util
import inspect
import itertools
import json
import os
import re
import sys
from typing import Any, Iterable, Sequence

import ml_collections
from ml_collections import config_dict

__all__ = [
    "ConfigOverrideError",
    "UnknownConfigKeyError",
    "apply_overrides",
    "config_from_json",
    "config_to_json",
    "flatten_keys",
    "load_config_file",
    "parse_override",
    "split_overrides",
]

_OVERRIDE_PREFIXES = ("--config.", "config.")
_module_counter = itertools.count()

_TRUE = frozenset({"true", "1", "yes", "y", "on", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "off", "f"})


class ConfigOverrideError(ValueError):
    """A malformed override or a value that cannot be parsed for its field."""


class UnknownConfigKeyError(KeyError, ValueError):
    """An override names a key that does not exist in the config.

    Subclasses both ``KeyError`` and ``ValueError`` so either can be caught.
    """

    def __str__(self) -> str:  # KeyError would repr() the message.
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------
# Loading config files
# ---------------------------------------------------------------------------


def _split_config_path(spec: str) -> tuple[str, str | None]:
    """Split ``"path/to/cfg.py:arg"`` into ``("path/to/cfg.py", "arg")``."""
    if os.path.isfile(spec):
        return spec, None
    m = re.match(r"^(.*?\.py):(.*)$", spec, flags=re.DOTALL)
    if m:
        return m.group(1), m.group(2)
    if ":" in spec:
        path, arg = spec.split(":", 1)
        return path, arg
    return spec, None


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Import the Python file ``path`` and return its ``get_config()``.

    ``path`` may carry an argument, as with ml_collections' ``config_flags``:
    ``"configs/pretrain.py:tiny"`` calls ``get_config("tiny")``.

    Raises:
      FileNotFoundError: the file does not exist.
      AttributeError: the file defines no callable ``get_config``.
      TypeError: ``get_config`` has the wrong signature for the given
        argument, or does not return a ``ConfigDict``.
    """
    file_path, arg = _split_config_path(os.fspath(path))
    if not os.path.isfile(file_path):
        hint = f" (parsed from {path!r})" if file_path != path else ""
        raise FileNotFoundError(f"Config file not found: {file_path!r}{hint}")

    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(file_path))[0])
    module_name = f"_apriel_jax_config_{stem}_{next(_module_counter)}"
    spec = importlib.util.spec_from_file_location(module_name, file_path)
    if spec is None or spec.loader is None:
        raise ImportError(f"Cannot import config file {file_path!r}")
    module = importlib.util.module_from_spec(spec)
    # Registered so that e.g. dataclasses/pickling inside the file can find it.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise

    get_config = getattr(module, "get_config", None)
    if get_config is None or not callable(get_config):
        raise AttributeError(
            f"Config file {file_path!r} must define a function get_config() "
            "returning an ml_collections.ConfigDict"
        )

    _check_signature(get_config, file_path, arg)
    cfg = get_config() if arg is None else get_config(arg)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise TypeError(
            f"get_config() in {file_path!r} returned {type(cfg).__name__}; "
            "expected an ml_collections.ConfigDict"
        )
    return cfg


def _check_signature(fn: Any, file_path: str, arg: str | None) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins etc.: just call it.
        return
    try:
        if arg is None:
            sig.bind()
        else:
            sig.bind(arg)
    except TypeError as e:
        if arg is None:
            raise TypeError(
                f"get_config{sig} in {file_path!r} requires an argument; pass it "
                f"as '{file_path}:ARG'"
            ) from e
        raise TypeError(
            f"get_config{sig} in {file_path!r} takes no argument, but "
            f"{arg!r} was given via '{file_path}:{arg}'"
        ) from e


# ---------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------


def _strip_prefix(token: str) -> str | None:
    for prefix in _OVERRIDE_PREFIXES:
        if token.startswith(prefix):
            return token[len(prefix):]
    return None


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate config overrides from the other command-line arguments.

    Returns ``(overrides, rest)``.  Each override is normalised to the single
    token form ``"--config.a.b=VALUE"`` (so it can be passed straight to
    :func:`apply_overrides`); ``rest`` keeps the other arguments in order, for
    ``argparse``.

    Recognised: ``--config.a.b=VALUE``, ``--config.a.b VALUE`` (the value is
    the next element, which may start with a single ``-`` as in ``-1`` but not
    with ``--``), and ``config.a.b=VALUE``.  ``--config`` / ``--config=path``
    (the config file flag itself) stays in ``rest``.  Everything after a bare
    ``--`` is passed through to ``rest`` untouched.
    """
    overrides: list[str] = []
    rest: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            rest.extend(argv[i:])
            break
        if tok.startswith("--config."):
            body = tok[len("--config."):]
            if "=" in body:
                overrides.append(tok)
                i += 1
                continue
            if not body:
                raise ConfigOverrideError(f"Empty config key in argument {tok!r}")
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigOverrideError(
                    f"Missing value for {tok!r}: use '{tok}=VALUE' or '{tok} VALUE'"
                )
            overrides.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        if tok.startswith("config.") and "=" in tok:
            overrides.append("--" + tok)
            i += 1
            continue
        rest.append(tok)
        i += 1
    return overrides, rest


def parse_override(override: str) -> tuple[str, str]:
    """Split ``"--config.a.b=VALUE"`` / ``"config.a.b=VALUE"`` into key, value."""
    body = _strip_prefix(override)
    if body is None:
        raise ConfigOverrideError(
            f"Invalid override {override!r}: expected '--config.KEY=VALUE' or "
            "'config.KEY=VALUE'"
        )
    key, sep, value = body.partition("=")
    if not sep:
        raise ConfigOverrideError(
            f"Invalid override {override!r}: missing '=VALUE' (use split_overrides() "
            "for the '--config.KEY VALUE' form)"
        )
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigOverrideError(f"Invalid config key {key!r} in override {override!r}")
    return key, value


def flatten_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted keys of ``cfg``: nested nodes and their leaves."""
    keys: list[str] = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        try:
            v = cfg[k]
        except Exception:  # pragma: no cover - defensive (lazy refs, etc.)
            continue
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(flatten_keys(v, full + "."))
    return keys


def _unknown_key(cfg: ml_collections.ConfigDict, key: str, override: str) -> UnknownConfigKeyError:
    all_keys = flatten_keys(cfg)
    close = difflib.get_close_matches(key, all_keys, n=5, cutoff=0.6)
    if not close:
        # Fall back to comparing only the last component (a misplaced leaf).
        leaf = key.rsplit(".", 1)[-1]
        scored = []
        for k in all_keys:
            k_leaf = k.rsplit(".", 1)[-1]
            score = difflib.SequenceMatcher(None, leaf, k_leaf).ratio()
            if len(leaf) >= 3 and leaf in k_leaf:
                score = max(score, 0.9)
            scored.append((score, k))
        close = [k for r, k in sorted(scored, key=lambda t: -t[0]) if r >= 0.7][:5]
    msg = f"Unknown config key {key!r} (from override {override!r})."
    if close:
        msg += " Did you mean: " + ", ".join(close) + "?"
    else:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        msg += f" No similar keys{' under ' + repr(parent) if parent else ''}."
    return UnknownConfigKeyError(msg)


def _resolve(cfg: ml_collections.ConfigDict, key: str, override: str) -> tuple[ml_collections.ConfigDict, str]:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise _unknown_key(cfg, key, override)
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise UnknownConfigKeyError(
                f"Cannot override {key!r}: {'.'.join(parts[: i + 1])!r} is a "
                f"{type(node).__name__} value, not a nested config"
            )
    if parts[-1] not in node:
        raise _unknown_key(cfg, key, override)
    return node, parts[-1]


def _fail(key: str, value: str, expected: str, detail: str = "") -> ConfigOverrideError:
    msg = f"Cannot parse value {value!r} for config key {key!r}: expected {expected}"
    if detail:
        msg += f" ({detail})"
    return ConfigOverrideError(msg)


def _parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise _fail(key, value, "bool", "one of true/false/1/0/yes/no")


def _parse_int(key: str, value: str) -> int:
    text = value.strip()
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return int(text)  # e.g. leading zeros "007"
    except ValueError:
        raise _fail(key, value, "int") from None


def _parse_float(key: str, value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise _fail(key, value, "float") from None


def _parse_sequence(key: str, value: str, typ: type, current: Any) -> Any:
    text = value.strip()
    if text == "":
        parsed: Any = ()
    else:
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise _fail(key, value, typ.__name__, f"not a Python literal: {e}") from None
    if isinstance(parsed, (str, bytes)) or not isinstance(parsed, (list, tuple)):
        if isinstance(parsed, (dict, set)):
            raise _fail(key, value, typ.__name__, f"got a {type(parsed).__name__}")
        parsed = (parsed,)
    items = list(parsed)
    existing = list(current) if isinstance(current, (list, tuple)) else []
    if existing and all(isinstance(x, float) for x in existing):
        for j, x in enumerate(items):
            if isinstance(x, int) and not isinstance(x, bool):
                items[j] = float(x)
    return typ(items)


def _parse_untyped(value: str) -> Any:
    text = value.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def _parse_value(key: str, value: str, typ: type, current: Any, is_placeholder: bool) -> Any:
    if is_placeholder and value.strip() in ("None", "none", "null"):
        return None
    if typ is bool:
        return _parse_bool(key, value)
    if typ is int:
        return _parse_int(key, value)
    if typ is float:
        return _parse_float(key, value)
    if typ is str:
        return value
    if typ is type(None):
        return _parse_untyped(value)
    if isinstance(typ, type) and issubclass(typ, (tuple, list)):
        return _parse_sequence(key, value, typ, current)
    if isinstance(typ, type) and issubclass(typ, ml_collections.ConfigDict):
        raise ConfigOverrideError(
            f"Cannot override {key!r} with {value!r}: it is a nested config; "
            f"override its fields instead (e.g. --config.{key}.FIELD=VALUE)"
        )
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        text = value.strip()
        for member in typ:
            if member.name == text or member.name.lower() == text.lower() or str(member.value) == text:
                return member
        raise _fail(key, value, typ.__name__, "one of " + ", ".join(m.name for m in typ))
    if isinstance(typ, type) and issubclass(typ, dict):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = None
        if not isinstance(parsed, dict):
            raise _fail(key, value, "dict literal")
        return parsed
    # Anything else: a literal of the right type, or the type's constructor.
    parsed = _parse_untyped(value)
    if isinstance(parsed, typ):
        return parsed
    try:
        return typ(value)
    except Exception as e:
        raise _fail(key, value, getattr(typ, "__name__", repr(typ)), str(e)) from None


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply ``--config.a.b=VALUE`` overrides to ``cfg`` (in place) and return it.

    Overrides are applied in order (a later one wins).  ``FieldReference``
    links are preserved: overriding a referenced field updates its dependents,
    exactly as assigning in Python would.

    Raises:
      UnknownConfigKeyError: (a ``KeyError`` and ``ValueError``) the key does
        not exist; the message lists the closest existing keys.
      ConfigOverrideError: (a ``ValueError``) malformed override, or the value
        cannot be parsed as the field's type; names key, value and type.
      TypeError: ``cfg`` is locked against changes (e.g. ``FrozenConfigDict``).
    """
    if isinstance(cfg, config_dict.FrozenConfigDict):
        raise TypeError("Cannot apply overrides to a FrozenConfigDict; pass a ConfigDict")
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of strings, not a single string")
    for override in overrides:
        key, value = parse_override(override)
        node, leaf = _resolve(cfg, key, override)
        typ = node.get_type(leaf)
        current = node[leaf]
        # placeholder(T) fields hold None but are typed T.
        is_placeholder = current is None and typ is not type(None)
        parsed = _parse_value(key, value, typ, current, is_placeholder)
        try:
            node[leaf] = parsed
        except (TypeError, ValueError) as e:
            raise ConfigOverrideError(
                f"Cannot set config key {key!r} to {parsed!r} (from {value!r}): {e}"
            ) from e
    return cfg


# ---------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    # numpy scalars / arrays, without importing numpy eagerly.
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(
        f"Config value of type {type(obj).__name__} ({obj!r}) is not JSON serialisable"
    )


def config_to_json(cfg: ml_collections.ConfigDict, indent: int | None = 2) -> str:
    """Serialise ``cfg`` (resolving references) to a JSON string.

    Tuples are written as JSON arrays and therefore load back as lists.
    Key order is preserved.
    """
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise TypeError(f"config_to_json expects a ConfigDict, got {type(cfg).__name__}")
    return json.dumps(cfg.to_dict(), indent=indent, default=_json_default)


def config_from_json(s: str) -> ml_collections.ConfigDict:
    """Inverse of :func:`config_to_json`: nested JSON objects become ConfigDicts.

    JSON arrays become Python lists (tuples are not restored).
    """
    data = json.loads(s)
    if not isinstance(data, dict):
        raise ValueError(
            f"Config JSON must be an object at the top level, got {type(data).__name__}"
        )
    return ml_collections.ConfigDict(data)
