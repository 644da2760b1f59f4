"""Tokenizers behind one small interface: HF ``tokenizer.json``, Mistral ``tekken.json``, SentencePiece ``.model``.

Everything downstream (prompt building, generation, the data pipeline) asks a :class:`Tokenizer` for
ids by token *string* (``[IMG]``, ``</s>``, ...). No id is hard-coded: Pixtral's tekken, an HF export
of it and the tiny tokenizer trained here happen to agree, other checkpoints need not.

``encode`` treats its input as plain text in both implementations: a user prompt that contains the
characters ``[IMG]`` stays text and can never smuggle in a control token. Special tokens are placed
by code (see ``apriel_jax/data/prompt.py``), never parsed out of text.

Chat formats live in ``apriel_jax/data/chat.py``; the base class keeps to what every implementation
can answer.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "HFTokenizer",
    "PIXTRAL_SPECIAL_TOKENS",
    "SentencePieceTokenizer",
    "TekkenTokenizer",
    "Tokenizer",
    "UnknownSpecialTokenError",
    "load_tokenizer",
    "pixtral_tekken_path",
    "tokenizer_summary",
    "train_tiny_sentencepiece",
    "train_tiny_tokenizer",
]

# Pixtral's control tokens in id order (tekken_240911): a tokenizer trained with these first gets
# exactly Pixtral's ids, so tiny test models exercise the same ids as the real ones.
PIXTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
)
# Reserved slots up to id 19, spelled with tekken's filler template.
_FILLER_TEMPLATE = "<SPECIAL_{id}>"
_NUM_TINY_SPECIAL = 20

HF_FILE = "tokenizer.json"
TEKKEN_FILE = "tekken.json"
SP_FILE = "tokenizer.model"


class UnknownSpecialTokenError(KeyError):
    """A special token string the tokenizer does not have. Also a KeyError, as for dict lookups."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all.
        return str(self.args[0]) if self.args else ""


class Tokenizer(abc.ABC):
    """What the rest of the project needs from a tokenizer.

    Subclasses implement ``encode``, ``decode``, ``vocab_size`` and ``special_tokens``; ids of
    named tokens (``bos_id``, ``image_id``, ...) are derived from ``special_tokens`` by string.
    """

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text: no BOS/EOS added, no special tokens recognised in it."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens=False``."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """All special (control) token strings and their ids."""

    def special_id(self, name: str) -> int:
        """Id of the special token spelled ``name`` (e.g. ``"[IMG]"``); KeyError if there is none."""
        table = self.special_tokens()
        if name in table:
            return table[name]
        raise UnknownSpecialTokenError(
            f"{type(self).__name__} has no special token {name!r}; it has {_describe(table)}"
        )

    # The tokens the model and the prompt builder rely on, by their Pixtral spelling.
    @property
    def bos_id(self) -> int:
        return self.special_id("<s>")

    @property
    def eos_id(self) -> int:
        return self.special_id("</s>")

    @property
    def pad_id(self) -> int:
        return self.special_id("<pad>")

    @property
    def image_id(self) -> int:
        return self.special_id("[IMG]")

    @property
    def image_break_id(self) -> int:
        return self.special_id("[IMG_BREAK]")

    @property
    def image_end_id(self) -> int:
        return self.special_id("[IMG_END]")


def _describe(table: dict[str, int]) -> str:
    """Readable list of special tokens; tekken's hundreds of numbered fillers are summarised."""
    named = [f"{s}={i}" for s, i in sorted(table.items(), key=lambda kv: kv[1]) if not _is_filler(s)]
    fillers = sum(1 for s in table if _is_filler(s))
    text = ", ".join(named) if named else "none"
    if fillers:
        text += f" (+{fillers} filler tokens like {_FILLER_TEMPLATE.format(id='N')})"
    return text


def _is_filler(token: str) -> bool:
    return token.startswith("<SPECIAL_") and token.endswith(">")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` ``tokenizer.json`` (e.g. mistral-community/pixtral-12b)."""

    def __init__(self, path):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        self._tok = _HFTokenizer.from_file(str(self.path))
        # Not stored in tokenizer.json, so set on every load: split "[IMG]" typed in text like any
        # other characters instead of turning it into the control token (tekken does the same).
        self._tok.encode_special_tokens = True
        self._special = {
            tok.content: int(i) for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special
        }

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: Pixtral's tokenizer.json has a post-processor that prepends <s>.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def special_id(self, name: str) -> int:
        # Fast path: avoids copying the table for the frequent bos/eos/image lookups.
        if name in self._special:
            return self._special[name]
        return super().special_id(name)


class TekkenTokenizer(Tokenizer):
    """Mistral's tiktoken-based ``tekken.json`` via mistral-common (Pixtral-12B-2409's own format)."""

    def __init__(self, path):
        from mistral_common.tokens.tokenizers.tekken import SpecialTokenPolicy, Tekkenizer

        self.path = Path(path)
        self._tok = Tekkenizer.from_file(self.path)
        self._policy = SpecialTokenPolicy
        self._special: dict[str, int] | None = None  # built on first full listing (1000 entries)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, bos=False, eos=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        policy = self._policy.IGNORE if skip_special_tokens else self._policy.KEEP
        return self._tok.decode([int(i) for i in ids], special_token_policy=policy)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.n_words)

    def special_tokens(self) -> dict[str, int]:
        if self._special is None:
            # Special ids are exactly 0 .. num_special_tokens-1 in tekken; their strings come from
            # the public id_to_piece (one short decode each, done once).
            self._special = {self._tok.id_to_piece(i): i for i in range(self._tok.num_special_tokens)}
        return dict(self._special)

    def special_id(self, name: str) -> int:
        try:
            return int(self._tok.get_special_token(name))
        except ValueError:
            return super().special_id(name)  # raises with the listing


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (Mistral v1-v3 ``tokenizer.model``, Llama-style checkpoints).

    Special tokens are the model's control pieces plus its unknown piece, looked up by piece string.
    SentencePiece keeps bos/eos as ids rather than named tokens; when a model spells them
    differently from ``<s>`` / ``</s>`` (or not at all), ``bos_id`` / ``eos_id`` fall back to the ids
    the model itself declares, so callers can keep asking for them by their Pixtral names.

    ``encode`` never produces control pieces from text (SentencePiece does not parse them), so text
    such as ``"[IMG]"`` stays text. User-defined pieces, which SentencePiece *does* match in text,
    are not treated as special: the Python API cannot tell them apart without the model proto.
    """

    def __init__(self, path):
        import sentencepiece as spm

        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        sp = self._sp
        # One pass over the vocabulary (32k ids take a few ms); ids never change after loading.
        self._special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                         if sp.is_control(i) or sp.is_unknown(i)}
        self._special_ids = frozenset(self._special.values())

    def encode(self, text: str) -> list[int]:
        # The processor adds no bos/eos unless configured to; ask explicitly so a model saved with
        # other defaults cannot change that.
        return list(self._sp.encode(text, add_bos=False, add_eos=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # SentencePiece would silently drop control ids; decode runs of ordinary ids and splice the
        # special pieces in by name when asked to keep them (the same rendering tekken gives).
        out, run = [], []
        for i in (int(i) for i in ids):
            if i in self._special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def special_id(self, name: str) -> int:
        if name in self._special:
            return self._special[name]
        # The model's own bos/eos/pad ids when the piece has another spelling (-1 means "none").
        fallback = {"<s>": self._sp.bos_id(), "</s>": self._sp.eos_id(), "<pad>": self._sp.pad_id()}
        if fallback.get(name, -1) >= 0:
            return int(fallback[name])
        return super().special_id(name)


def pixtral_tekken_path() -> Path:
    """Path of Pixtral-12B-2409's ``tekken_240911.json`` as shipped inside the mistral-common package."""
    from importlib.resources import files

    path = Path(str(files("mistral_common") / "data" / "tekken_240911.json"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this mistral-common install ships no tekken_240911.json")
    return path


def _is_sentencepiece_name(name: str) -> bool:
    # "tokenizer.model" and mistral-common's versioned "..._240323.model.v3" names.
    return name.endswith(".model") or ".model.v" in name


def _staged(url: str) -> str:
    """A verified local copy of the tokenizer file at ``url`` (a ``gs://`` file, or a folder holding one
    of the known names): tokenizer libraries read local files only."""
    from apriel_jax import storage  # local: keeps this module light for local-only use

    storage.preflight(read=[url])  # credentials and bucket: a missing one is named as such, not as "no file"
    loc = storage.location(url)
    with storage.storage_errors(loc, "read"):
        if loc.is_file():
            return storage.local_copy(loc)
        for name in (HF_FILE, TEKKEN_FILE, SP_FILE):
            if (loc / name).is_file():
                return storage.local_copy(loc / name)
    raise FileNotFoundError(f"{url}: no tokenizer file, nor a folder with {HF_FILE}, {TEKKEN_FILE} or {SP_FILE}")


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer at ``path``: a ``tokenizer.json``, ``tekken*.json`` or SentencePiece ``*.model``
    file, or a directory holding one; local or ``gs://`` (staged into the local cache of
    :func:`apriel_jax.storage.local_copy`, whose copy keeps the object's file name).

    A directory with several gives the HF one first (it is what an HF checkpoint directory is read
    with), then tekken, then ``tokenizer.model``.
    """
    if str(path).startswith("gs://"):
        path = _staged(str(path))
    path = Path(path)
    if path.is_dir():
        for name, cls in ((HF_FILE, HFTokenizer), (TEKKEN_FILE, TekkenTokenizer), (SP_FILE, SentencePieceTokenizer)):
            if (path / name).is_file():
                return cls(path / name)
        raise FileNotFoundError(
            f"{path}: no tokenizer found (looked for {HF_FILE}, {TEKKEN_FILE} and {SP_FILE})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    if path.name.startswith("tekken"):
        return TekkenTokenizer(path)
    if _is_sentencepiece_name(path.name):
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)


def train_tiny_sentencepiece(texts: Sequence[str], vocab_size: int, out_prefix) -> SentencePieceTokenizer:
    """Train a tiny byte-fallback BPE SentencePiece model on ``texts``; writes ``{out_prefix}.model``.

    Ids 0-19 are Pixtral's special tokens in Pixtral's order (unk/bos/eos as SentencePiece's reserved
    ids, the rest as control pieces, so text never produces them), as in :func:`train_tiny_tokenizer`.
    Normalisation, whitespace collapsing and the dummy ``▁`` prefix are switched off so that
    ``decode(encode(t)) == t`` for any text and text encoded in pieces (as chat rendering does) gets
    no invented spaces. A short corpus may yield fewer than ``vocab_size`` pieces.
    """
    import sentencepiece as spm

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    controls = list(PIXTRAL_SPECIAL_TOKENS[3:]) + [
        _FILLER_TEMPLATE.format(id=i) for i in range(len(PIXTRAL_SPECIAL_TOKENS), _NUM_TINY_SPECIAL)]
    minimum = _NUM_TINY_SPECIAL + 256  # specials + byte-fallback pieces
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: {_NUM_TINY_SPECIAL} special tokens and "
                         f"256 byte pieces need at least {minimum}")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=str(out_prefix), vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=controls,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, hard_vocab_limit=False, minloglevel=2,
    )
    tok = SentencePieceTokenizer(f"{out_prefix}.model")
    got = [tok.special_id(s) for s in PIXTRAL_SPECIAL_TOKENS]
    if got != list(range(len(PIXTRAL_SPECIAL_TOKENS))):
        raise RuntimeError(f"trained model has special ids {got}, expected 0..{len(PIXTRAL_SPECIAL_TOKENS) - 1}")
    return tok


def train_tiny_tokenizer(texts: Sequence[str], vocab_size: int, out_path) -> HFTokenizer:
    """Train a byte-level BPE on ``texts`` and save it as an HF ``tokenizer.json`` at ``out_path``.

    Ids 0-19 are Pixtral's special tokens in Pixtral's order (``<unk>``, ``<s>``, ``</s>``, ...,
    ``[IMG]``=10, ``<pad>``=11, ``[IMG_BREAK]``=12, ``[IMG_END]``=13, fillers up to 19), then the 256
    byte symbols, then merges. A short corpus runs out of merges before ``vocab_size``; the remaining
    ids become plain ``<unused_N>`` tokens so the tokenizer covers every row of a model's embedding
    table (a random model's output then decodes to something visible instead of silently nothing).

    ``out_path`` is the ``.json`` file to write, or a directory (created if needed) to write
    ``tokenizer.json`` into.
    """
    from tokenizers import AddedToken, Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(PIXTRAL_SPECIAL_TOKENS) + [
        _FILLER_TEMPLATE.format(id=i) for i in range(len(PIXTRAL_SPECIAL_TOKENS), _NUM_TINY_SPECIAL)
    ]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(specials) + len(alphabet)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: {len(specials)} special tokens and "
                         f"{len(alphabet)} byte symbols need at least {minimum}")

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer)
    learned = tok.get_vocab_size(with_added_tokens=True)
    if learned < vocab_size:
        tok.add_tokens([AddedToken(f"<unused_{i}>", special=False, normalized=False)
                        for i in range(learned, vocab_size)])

    # The trainer is documented to put special tokens first, in order; verify rather than trust.
    got = [tok.token_to_id(s) for s in specials]
    if got != list(range(len(specials))):
        raise RuntimeError(f"trained tokenizer has special ids {got}, expected 0..{len(specials) - 1}")

    out_path = Path(out_path)
    if out_path.is_dir() or out_path.suffix != ".json":
        out_path = out_path / HF_FILE
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return HFTokenizer(out_path)


def tokenizer_summary(tokenizer: Tokenizer) -> str:
    """One line naming the tokenizer and its image/control ids (for logs and the demo)."""
    ids = {name: tokenizer.special_id(name) for name in ("<s>", "</s>", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]")}
    return f"{type(tokenizer).__name__}(vocab={tokenizer.vocab_size}, " + json.dumps(ids)[1:-1] + ")"
