"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers` model (tokenizer.json) with the special ids
a diffusion model needs (mask, EOS, pad, fill-in-the-middle) and an optional jinja chat template."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from unmask.errors import UnmaskError
from unmask.io import atomic_write_text

MASK = "<|mask|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [EOS, PAD, MASK, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, USER, ASSISTANT]

# Used when a checkpoint ships no template: one turn per message, the answer opened by ASSISTANT.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' or m['role'] == 'system' %}<|user|>{{ m['content'] }}\n"
    "{% else %}<|assistant|>{{ m['content'] }}<|endoftext|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class TokenizerError(UnmaskError, ValueError):
    pass


class Tokenizer:
    """Encode/decode text; knows the special ids. Byte-level BPE round-trips any text exactly."""

    def __init__(
        self,
        hf: HFTokenizer,
        mask_id: int,
        eos_id: int,
        pad_id: int | None = None,
        bos_id: int | None = None,
        chat_template: str | None = None,
        extra_special: dict[str, int] | None = None,
    ):
        self.hf = hf
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.special = dict(extra_special or {})

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        """Train a byte-level BPE with our special tokens at ids 0..len(SPECIAL_TOKENS)-1."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls.from_hf(hf)

    @classmethod
    def from_hf(cls, hf: HFTokenizer, chat_template: str | None = DEFAULT_CHAT_TEMPLATE) -> "Tokenizer":
        ids = {tok: hf.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None and t in (MASK, EOS)]
        if missing:
            raise TokenizerError(f"tokenizer lacks special tokens {missing}")
        return cls(hf, mask_id=ids[MASK], eos_id=ids[EOS], pad_id=ids[PAD], chat_template=chat_template,
                   extra_special={t: i for t, i in ids.items() if i is not None})

    @classmethod
    def from_dir(cls, path: str | Path, mask_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, bos_id: int | None = None) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json for the chat template) from a model folder.

        Explicit ids (from the model config) win over what the tokenizer files say."""
        path = Path(path)
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            try:
                cfg = json.loads((path / "tokenizer_config.json").read_text())
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{path / 'tokenizer_config.json'} is not valid JSON: {e}") from None
        file = path / "tokenizer.json"
        if file.exists():
            try:
                hf = HFTokenizer.from_file(str(file))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise TokenizerError(f"cannot read {file}: {e}") from None
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            file = path / "vocab.json"
            hf = _qwen2_bpe(path, cfg)  # Dream-v0 ships only its slow tokenizer's files
        else:
            raise TokenizerError(f"no tokenizer.json (or vocab.json + merges.txt) in {path}")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF allows a list of named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        ids = {tok: hf.token_to_id(tok) for tok in SPECIAL_TOKENS}

        def pick(explicit, key, fallback):
            if explicit is not None:
                return explicit
            name = cfg.get(key)
            if isinstance(name, dict):
                name = name.get("content")
            if isinstance(name, str) and hf.token_to_id(name) is not None:
                return hf.token_to_id(name)
            return fallback

        mask = pick(mask_id, "mask_token", ids[MASK])
        eos = pick(eos_id, "eos_token", ids[EOS])
        if mask is None or eos is None:
            raise TokenizerError(f"{file}: cannot tell the mask/EOS ids; set mask_id/eos_id in config.json")
        return cls(hf, mask_id=mask, eos_id=eos, pad_id=pick(pad_id, "pad_token", ids[PAD]),
                   bos_id=pick(bos_id, "bos_token", None),
                   chat_template=template if template is not None else (DEFAULT_CHAT_TEMPLATE if ids[USER] is not None else None),
                   extra_special={**_added_special(hf), **{t: i for t, i in ids.items() if i is not None}})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "tokenizer.json", self.hf.to_str(pretty=False))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "mask_token": self.hf.id_to_token(self.mask_id),
            "eos_token": self.hf.id_to_token(self.eos_id),
            "pad_token": self.hf.id_to_token(self.pad_id),
        }
        if self.bos_id is not None:
            cfg["bos_token"] = self.hf.id_to_token(self.bos_id)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        atomic_write_text(path / "tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")

    # --- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            specials = set(self.special.values()) | {self.mask_id, self.eos_id, self.pad_id}
            ids = [i for i in ids if i not in specials]
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for, even when they are only part of a UTF-8 character (where decode
        gives "\ufffd"): byte-level vocabularies spell bytes as characters, GPT-2's table maps them back."""
        piece = self.hf.id_to_token(int(i))
        table = _byte_decoder() if self._byte_level() else {}
        if piece is None or int(i) in self.hf.get_added_tokens_decoder() or not all(ch in table for ch in piece):
            return self.decode([i]).encode("utf-8")
        return bytes(table[ch] for ch in piece)

    def _byte_level(self) -> bool:
        if not hasattr(self, "_is_byte_level"):
            decoder = json.loads(self.hf.to_str()).get("decoder") or {}
            parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
            self._is_byte_level = any(d.get("type") == "ByteLevel" for d in parts)
        return self._is_byte_level

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render the chat template as transformers does; `variables` are extra template variables, as the
        keyword arguments of HF's apply_chat_template (e.g. Qwen3's `enable_thinking=False`)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        import jinja2

        try:
            tmpl = _template_env().from_string(self.chat_template)
            return tmpl.render(**self._special_token_strings(), **variables, messages=messages,
                               add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # a broken template or one that needs what we do not pass
            raise TokenizerError(f"chat template: {e}") from None

    def _special_token_strings(self) -> dict[str, str]:
        """bos_token / eos_token / pad_token as templates see them (HF passes the special tokens map)."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {name: self.hf.id_to_token(i) if i is not None else "" for name, i in names.items()}


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the other
    bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _template_env():
    import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # templates ship inside downloaded checkpoints: render them sandboxed, with what HF's renderer provides
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """HF's tojson: plain json.dumps. jinja's own escapes <, >, & and ' for HTML and sorts keys, which would
    change the tool definitions a model was trained to read."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# Qwen2's pre-tokenizer split (the same regex as transformers' Qwen2Tokenizer and Dream's DreamTokenizer)
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SLOW_CLASSES = ("Qwen2Tokenizer", "DreamTokenizer")


def _qwen2_bpe(path: Path, cfg: dict) -> HFTokenizer:
    """Build the fast equivalent of a Qwen2-style slow tokenizer (vocab.json + merges.txt, NFC, Qwen2 split,
    byte-level BPE) with the added tokens of tokenizer_config.json at their published ids."""
    cls = cfg.get("tokenizer_class")
    if cls not in QWEN2_SLOW_CLASSES:
        raise TokenizerError(f"{path}: no tokenizer.json, and vocab.json + merges.txt are only understood for "
                             f"{', '.join(QWEN2_SLOW_CLASSES)} (tokenizer_class is {cls!r})")
    from tokenizers import AddedToken, Regex, normalizers

    try:
        hf = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    except Exception as e:
        raise TokenizerError(f"cannot read {path / 'vocab.json'} / merges.txt: {e}") from None
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    added = {int(i): t for i, t in (cfg.get("added_tokens_decoder") or {}).items()}
    if not added and (path / "added_tokens.json").exists():
        added = {int(i): {"content": t, "special": True}
                 for t, i in json.loads((path / "added_tokens.json").read_text()).items()}
    for i in sorted(added):  # ids follow the vocabulary in order, so adding them in id order keeps them
        t = added[i]
        token = AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                           rstrip=t.get("rstrip", False), normalized=t.get("normalized", not t.get("special")),
                           special=t.get("special", False))
        if token.special:
            hf.add_special_tokens([token])
        else:
            hf.add_tokens([token])
        if hf.token_to_id(t["content"]) != i:
            raise TokenizerError(f"{path}: added token {t['content']!r} should have id {i} but gets "
                                 f"{hf.token_to_id(t['content'])} after vocab.json's {len(hf.get_vocab(False))} tokens")
    return hf


def _added_special(hf: HFTokenizer) -> dict[str, int]:
    """A checkpoint's own special tokens (`<|eot_id|>`, `<|im_end|>`, ...), so skip_special drops them too."""
    return {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}


def _raise_template_error(message: str):
    raise TokenizerError(f"chat template: {message}")
