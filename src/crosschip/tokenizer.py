"""Byte-level BPE tokenizer (the `tokenizers` library), saved as `tokenizer.json`.

Pre-tokenization, in order:
1. `Digits(individual_digits=True)`: every digit is its own piece, so numbers tokenize one
   digit per token (the arithmetic task depends on it);
2. `Punctuation("isolated")`: every punctuation character is its own piece, so no token spans
   a prompt/completion boundary such as `"="` + `"-("`; encoding a prompt and its completion
   separately gives the same ids as encoding their concatenation;
3. `ByteLevel(add_prefix_space=False, use_regex=True)`: GPT-2 word splitting over the bytes.
There is no normalizer, and the ByteLevel decoder maps bytes back, so every UTF-8 string
round-trips exactly: `decode(encode(s)) == s`.

Special tokens: `<|bos|>`, `<|eos|>`, `<|pad|>` and the chat markers `<|system|>`, `<|user|>`,
`<|assistant|>`, `<|end|>` take ids 0..6. Like every `tokenizers`/transformers tokenizer, a
text that literally contains one of these strings encodes it as the special token (that is how
a rendered chat template becomes ids); no other text can produce them. `decode` drops them by
default, so such a text does not round-trip unless `skip_special=False`.

Chat format (`apply_chat_template`): the Jinja template in `tokenizer_config.json`, rendered
as transformers and vLLM render it, so a bundle whose template was edited is served with the
edit. `save` writes `CHAT_TEMPLATE`, which gives
    <|bos|><|system|>SYSTEM<|end|><|user|>QUESTION<|end|><|assistant|>ANSWER<|end|>
The rendered string already starts with `<|bos|>`: encode it with `add_bos=False`. A reply
ends with `<|end|>` (`end_id`), which a server should treat as a stop token next to `<|eos|>`.

With transformers, `AutoTokenizer.from_pretrained(dir)` loads the saved folder; its default
`add_special_tokens=True` prepends `<|bos|>` exactly like `encode(text, add_bos=True)`.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from crosschip.errors import CrosschipError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
END = "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, *(f"<|{role}|>" for role in ROLES), END]
DEFAULT_MAX_LENGTH = 512
"""`model_max_length` written to tokenizer_config.json unless `save` is told otherwise
(arith-tiny's max_position_embeddings)."""

# The chat template `save` writes. OpenAI's `developer` role (its newer name for the system
# message) renders as `system`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['content'] is not string %}"
    "{{ raise_exception('chat message content must be a string') }}"
    "{% endif %}"
    "{{ '<|' + role + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _byte_level_alphabet() -> dict[str, int]:
    """The ByteLevel pre-tokenizer's character for each byte, inverted (char -> byte).

    Bytes that are printable Latin-1 stand for themselves; the other 68 (controls, space,
    0x7F-0xA0, 0xAD) take the characters from U+0100 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + n): b for n, b in enumerate(others)})
    return table


_BYTE_OF_CHAR = _byte_level_alphabet()


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


class Tokenizer:
    """Byte-level BPE with BOS/EOS/PAD and chat markers; see the module docstring."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        chat_template: str = CHAT_TEMPLATE,
    ):
        self._tok = backend
        ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise CrosschipError(f"tokenizer: special tokens missing from the vocabulary: {', '.join(missing)}")
        self.bos_id: int = ids[BOS]
        self.eos_id: int = ids[EOS]
        self.pad_id: int = ids[PAD]
        self.end_id: int = ids[END]
        """`<|end|>`, which closes every chat message."""
        self.special_ids: frozenset[int] = frozenset(ids.values())
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self._chat = _compile_chat_template(chat_template)

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary, special tokens included (ids are 0..vocab_size-1)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @functools.cached_property
    def max_token_chars(self) -> int | None:
        """The most characters of text one token stands for, so that a text of more than
        context x this characters is known to overflow the context without tokenizing it
        (the server was 61 s and 4.9 GB into a 50 MB prompt before it said so). A byte-level
        token's string has one character per byte it covers, and a character is at least a
        byte. None where a normalizer rewrites the text first: then no such bound holds."""
        if self._tok.normalizer is not None:
            return None
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)))

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, with `<|bos|>` first when `add_bos`."""
        # The batch call releases the GIL while it works, the single one does not: a server
        # tokenizing a long prompt in a worker thread keeps its event loop (and no slower: 9.5
        # against 10.1 us for 6 characters).
        ids = self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (the Rust side runs them in parallel).

        The fast variant skips character offsets, which nothing here reads: 8.0 against 18.4 ms
        for 256 arithmetic completions, a large part of what the training stream spends per batch."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [[self.bos_id, *e.ids] if add_bos else e.ids for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped when `skip_special`."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each id decoded on its own, for display (a multi-byte character may show as U+FFFD)."""
        return [self._tok.decode([i], skip_special_tokens=False) for i in ids]

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each id's own bytes: what it adds to a decoded text, even when that is part of a
        multi-byte character (OpenAI's logprob `bytes`). Special tokens give their text."""
        out = []
        for i in ids:
            piece = self._tok.id_to_token(i)
            if piece is None:
                raise CrosschipError(f"tokenizer: token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i in self.special_ids:
                out.append(piece.encode("utf-8"))
            else:
                out.append(bytes(_BYTE_OF_CHAR[c] for c in piece))
        return out

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The chat rendered by the chat template (the built-in one starts with `<|bos|>`:
        encode it with add_bos=False).

        The messages' shape is checked here, whatever the template: a non-empty list of dicts
        with a string role and string content. Which roles exist is the template's to say."""
        if not messages:
            raise CrosschipError("chat: no messages to render")  # transformers refuses an empty chat too
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise CrosschipError(f"chat message {i}: expected a dict with 'role' and 'content', got {message!r}")
            if not isinstance(message.get("role"), str):
                raise CrosschipError(f"chat message {i}: role must be a string, got {message.get('role')!r}")
            if not isinstance(message.get("content"), str):
                raise CrosschipError(
                    f"chat message {i}: content must be a string, got {type(message.get('content')).__name__}"
                )
        try:
            return self._chat.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=BOS,
                eos_token=EOS,
                pad_token=PAD,
            )
        except Exception as e:  # raise_exception() in the template, or a template that fails on this chat
            raise CrosschipError(f"chat template: {e}") from None

    def save(self, directory: str | Path, *, model_max_length: int | None = None) -> None:
        """Write `tokenizer.json` and a transformers `tokenizer_config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": SPECIAL_TOKENS[3:],
            "model_max_length": model_max_length or self.model_max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a folder written by `save` (only `tokenizer.json` is required)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CrosschipError(f"tokenizer: {path} not found")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on any parse error
            raise CrosschipError(f"tokenizer: {path} is not a valid tokenizer.json ({e})") from None
        config = _config_of(directory)
        try:
            max_length = int(config["model_max_length"])
        except (KeyError, TypeError, ValueError):
            max_length = DEFAULT_MAX_LENGTH
        template = config.get("chat_template", CHAT_TEMPLATE)
        if not isinstance(template, str):  # transformers' named templates (a list) are not supported
            raise CrosschipError(
                f"tokenizer: {directory / 'tokenizer_config.json'}: chat_template must be one template (a string)"
            )
        try:
            return cls(backend, model_max_length=max_length, chat_template=template)
        except CrosschipError as e:
            raise CrosschipError(f"tokenizer: {directory / 'tokenizer_config.json'}: {e}") from None


def _config_of(directory: Path) -> dict:
    """tokenizer_config.json as a dict; {} when it is missing or not a JSON object."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _raise_exception(message: str):
    """The `raise_exception` a chat template calls to refuse a chat (as in transformers)."""
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """Jinja's `tojson` as chat templates expect it (transformers' keywords): unlike Jinja's
    own, it does not escape HTML characters, and keeps non-ASCII text as it is."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile_chat_template(source: str):
    """A chat template compiled as transformers compiles it: a sandbox (a template is data from
    the bundle, not code to trust), blocks trimmed, `raise_exception` and `tojson` available."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CrosschipError(f"chat_template does not compile: {e.message} (line {e.lineno})") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Train a byte-level BPE on `texts`; deterministic for the same texts and size.

    The vocabulary holds the 7 special tokens, all 256 bytes and up to `vocab_size - 263`
    merges (fewer when the texts run out of pairs seen at least twice).
    """
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise CrosschipError(f"tokenizer: vocab_size must be at least {floor} (specials + 256 bytes), got {vocab_size}")
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # transformers' default add_special_tokens=True then prepends BOS, like encode(add_bos=True).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return Tokenizer(backend)


@functools.lru_cache(maxsize=4)
def default_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """The tokenizer trained on the shipped corpus plus arithmetic problems (cached per size)."""
    from crosschip.data.arith import iter_problems
    from crosschip.data.corpus import builtin_corpus

    problems = iter_problems(digits=3, ops=["+", "-"], seed=0)
    arith = [next(problems).text for _ in range(4000)]
    return train_tokenizer([*builtin_corpus(), *arith], vocab_size)


def model_tokenizer(vocab_size: int) -> Tokenizer:
    """The tokenizer `crosschip train` gives a model of `vocab_size` tokens: the default one,
    at most 1,024 tokens (a larger embedding keeps its spare rows)."""
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise CrosschipError(f"model.vocab_size {vocab_size} is below the tokenizer's minimum of {floor}")
    return default_tokenizer(min(vocab_size, 1024))
