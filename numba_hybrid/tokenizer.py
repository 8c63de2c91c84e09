"""Byte-level BPE tokenizer and chat template, rebuilt from a GGUF file's metadata.

The vocabulary, merges and pre-tokenizer name stored under ``tokenizer.ggml.*`` are turned
into a Hugging Face ``tokenizers.Tokenizer`` (NFC, the model's split regex, ByteLevel) whose
ids equal the GGUF ids, so encoding matches llama.cpp. CONTROL and USER_DEFINED tokens that
appear in the text (``<|im_start|>`` ...) are matched atomically, as llama.cpp's
``parse_special`` does. Decoding goes through :meth:`Tokenizer.token_to_piece`, the raw bytes
of each token, so a caller can also stream UTF-8 safely.

``tokenizer.chat_template`` is rendered in jinja2's immutable sandbox, set up as Hugging Face
transformers does, so a template cannot reach Python internals, files or modules.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Iterable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelFormatError, UnsupportedModelError

# Pre-tokenizer split regexes by ``tokenizer.ggml.pre`` value (as in llama.cpp's llama-vocab).
PRE_TOKENIZER_REGEX = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
              r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
EOG_TEXTS = ("<|im_end|>", "<|endoftext|>")
_FILLER = re.compile(r"\[PAD\d+\]")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte table (inverse of ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _required(gguf, getter: str, key: str) -> Any:
    if not gguf.has(key):
        raise ModelFormatError(f"tokenizer metadata key {key!r} is missing")
    return getattr(gguf, getter)(key)


class Tokenizer:
    """Encode/decode text with GGUF token ids and render the model's chat template."""

    def __init__(self, hf: _HFTokenizer, tokens: list[str], token_types: list[int],
                 eos_id: int, bos_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None):
        self._hf = hf
        self._tokens = tokens
        self._types = token_types
        self._eos_id = eos_id
        self._bos_id = bos_id
        self._add_bos = add_bos
        self.chat_template = chat_template  # may be replaced; rendered in a sandbox
        byte_of = _byte_decoder()
        pieces = []
        for text, ttype in zip(tokens, token_types):
            if ttype == UNUSED or _FILLER.fullmatch(text):
                pieces.append(b"")
            elif ttype in (CONTROL, USER_DEFINED):
                pieces.append(text.encode("utf-8"))
            else:  # byte-level text: each character stands for one byte
                pieces.append(b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode()
                                       for c in text))
        self._pieces = pieces
        eog = {eos_id} | {i for i, (t, ty) in enumerate(zip(tokens, token_types))
                          if t in EOG_TEXTS and ty != UNUSED}
        self._eog_ids = frozenset(eog)

    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer":
        """Build from a :class:`~numba_hybrid.gguf_file.GGUFFile` (only its typed getters)."""
        model = _required(gguf, "get_str", "tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedModelError(
                f"tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level BPE)")
        pre = _required(gguf, "get_str", "tokenizer.ggml.pre")
        if pre not in PRE_TOKENIZER_REGEX:
            raise UnsupportedModelError(
                f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported "
                f"(supported: {', '.join(sorted(PRE_TOKENIZER_REGEX))})")
        tokens = [str(t) for t in _required(gguf, "get_array", "tokenizer.ggml.tokens")]
        types = _required(gguf, "get_array", "tokenizer.ggml.token_type")
        if not all(isinstance(t, int) for t in types):  # int("x") would escape as ValueError
            raise ModelFormatError("tokenizer.ggml.token_type must be an array of integers")
        merges = _required(gguf, "get_array", "tokenizer.ggml.merges")
        if len(types) != len(tokens):
            raise ModelFormatError(f"tokenizer.ggml.token_type has {len(types)} entries but "
                                   f"tokenizer.ggml.tokens has {len(tokens)}")
        vocab: dict[str, int] = {}
        for i, (text, ttype) in enumerate(zip(tokens, types)):
            if ttype == UNUSED or _FILLER.fullmatch(text):
                continue
            vocab[text] = i  # a duplicated text keeps its last id, as in llama.cpp
        pairs = [tuple(str(m).split(" ", 1)) for m in merges]
        if any(len(p) != 2 for p in pairs):
            raise ModelFormatError("tokenizer.ggml.merges has an entry without a space")
        try:
            hf = _HFTokenizer(models.BPE(
                vocab=vocab, merges=pairs, unk_token=None, continuing_subword_prefix="",
                end_of_word_suffix="", fuse_unk=False, byte_fallback=False, dropout=None))
        except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge
            # of tokens that are not in the vocabulary
            raise ModelFormatError(f"tokenizer.ggml.merges do not fit the vocabulary "
                                   f"({exc})") from None
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[pre]), behavior="isolated",
                                 invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, i in vocab.items() if types[i] == CONTROL])
        hf.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, i in vocab.items() if types[i] == USER_DEFINED])
        wrong = [(t, i) for t, i in vocab.items() if hf.token_to_id(t) != i]
        if wrong or hf.get_vocab_size(with_added_tokens=True) != len(vocab):
            raise ModelFormatError(f"tokenizer vocabulary is inconsistent (e.g. {wrong[:3]})")

        def opt_id(key: str) -> int | None:
            if not gguf.has(key):
                return None
            value = gguf.get_int(key)
            if not 0 <= value < len(tokens):
                raise ModelFormatError(f"{key} = {value} is outside the vocabulary "
                                       f"(size {len(tokens)})")
            return value

        eos_id = opt_id("tokenizer.ggml.eos_token_id")
        if eos_id is None:
            eos_id = next((vocab[t] for t in EOG_TEXTS if t in vocab), None)
            if eos_id is None:
                raise ModelFormatError("tokenizer metadata key 'tokenizer.ggml.eos_token_id' "
                                       "is missing")
        template = gguf.get_str("tokenizer.chat_template") \
            if gguf.has("tokenizer.chat_template") else None
        return cls(hf, tokens, types, eos_id, opt_id("tokenizer.ggml.bos_token_id"),
                   gguf.get_bool("tokenizer.ggml.add_bos_token", False), template)

    # ---- properties ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eog_ids(self) -> frozenset[int]:
        return self._eog_ids

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    # ---- encode / decode -------------------------------------------------------------

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text become their ids.
        ``add_special`` prepends BOS when the model asks for it (``add_bos``)."""
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_special and self._add_bos and self._bos_id is not None:
            ids = [self._bos_id] + ids
        return ids

    def token_to_piece(self, token_id: int) -> bytes:
        """The raw bytes of one token (possibly part of a UTF-8 character); b"" for fillers."""
        if not 0 <= int(token_id) < len(self._pieces):
            raise ValueError(f"token id {token_id} is outside the vocabulary "
                             f"(size {len(self._pieces)})")
        return self._pieces[int(token_id)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. ``skip_special`` drops CONTROL tokens."""
        data = b"".join(self.token_to_piece(i) for i in ids
                        if not (skip_special and self._types[int(i)] == CONTROL))
        return data.decode("utf-8", errors="replace")

    # ---- chat template ---------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the model's chat template, in a jinja2 sandbox."""
        if not self.chat_template:
            raise ModelFormatError("this model has no chat template (tokenizer.chat_template)")
        tok_text = lambda i: "" if i is None else self._tokens[i]  # noqa: E731
        context = {"bos_token": tok_text(self._bos_id), "eos_token": tok_text(self._eos_id),
                   **kwargs, "messages": messages,
                   "add_generation_prompt": add_generation_prompt}
        try:
            return _sandbox().from_string(self.chat_template).render(**context)
        except jinja2.TemplateError as exc:
            raise ModelFormatError(f"chat template failed: {type(exc).__name__}: {exc}") from None


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _sandbox() -> ImmutableSandboxedEnvironment:
    """The environment transformers uses; the empty loader makes ``import``/``include`` fail."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols],
                                        loader=jinja2.DictLoader({}))
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
