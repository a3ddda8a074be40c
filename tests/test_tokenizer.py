"""The byte-level BPE tokenizer: exact round trips, digit splitting, specials, chat, HF loading."""

from __future__ import annotations

import json
import random

import pytest

from crosschip.data import builtin_corpus, generate_problems
from crosschip.errors import CrosschipError
from crosschip.tokenizer import SPECIAL_TOKENS, Tokenizer, default_tokenizer, train_tokenizer
from serve_helpers import tokenizer_with

CHATS = [
    [{"role": "user", "content": "12+7="}],
    [
        {"role": "system", "content": "You add numbers.\nShow the working."},
        {"role": "user", "content": "What is 243+606? 🤖"},
        {"role": "assistant", "content": "3+6+0=9 c0|answer: 849"},
        {"role": "user", "content": "  and 5-9?  "},
    ],
    [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "1+1="}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer(512)


@pytest.fixture(scope="module")
def saved(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tok")
    tok.save(directory)
    return directory


def _random_text(rng: random.Random) -> str:
    """A string mixing ASCII, whitespace runs, control chars, accents, CJK, emoji and digits."""
    pools = [
        "abcdefghijklmnopqrstuvwxyz ABCXYZ",
        "0123456789+-=|:.,;!?()[]{}<>'\"",
        " \t\n\r\x0b\x0c\x00\x1b  \n\n",
        "éüñßøçÅ ΩΣπ Жзы ",
        "中文字符日本語한국어",
        "🤖🚀👍🏽👨‍👩‍👧\u200d\ufe0f",
    ]
    n = rng.randint(0, 40)
    return "".join(rng.choice(pools[rng.randrange(len(pools))]) for _ in range(n)) + chr(rng.randint(0x20, 0x2FFFF))


def _no_specials(text: str) -> bool:
    return not any(special in text for special in SPECIAL_TOKENS)


def test_round_trip_random_unicode(tok: Tokenizer):
    rng = random.Random(0)
    for _ in range(2000):
        text = _random_text(rng)
        if 0xD800 <= ord(text[-1]) <= 0xDFFF or not _no_specials(text):
            continue  # lone surrogates are not valid UTF-8 text
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert not set(ids) & tok.special_ids
        assert all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "   leading",
        "trailing   ",
        "a  b   c",
        "\n\nx\n",
        "\t\r\n",
        "café ☕ 🤖🤖",
        "你好，世界",
        "\x00\x01\x7f",
        "x" * 500,
    ],
)
def test_round_trip_edge_cases(tok: Tokenizer, text: str):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_corpus(tok: Tokenizer):
    docs = builtin_corpus()
    for doc, ids in zip(docs, tok.encode_batch(docs)):
        assert tok.decode(ids) == doc


def test_no_token_stands_for_more_characters_than_max_token_chars(tok: Tokenizer):
    """The server refuses a text longer than context x max_token_chars untokenized: every
    text must then take at least len(text) / max_token_chars tokens."""
    most = tok.max_token_chars
    assert most == max(len(t) for t in tok._tok.get_vocab(with_added_tokens=True))
    rng = random.Random(1)
    texts = [*builtin_corpus(), "<|bos|><|assistant|>" * 50, "x" * 500, "the " * 200]
    texts += [_random_text(rng) for _ in range(500)]
    for text in texts:
        if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            continue
        assert len(tok.encode(text)) * most >= len(text), repr(text[:40])


def test_token_bytes_join_to_the_text_even_inside_a_character(tok: Tokenizer):
    # Every code point up to U+07FF (all 1- and 2-byte forms, controls included) and a
    # spread of 3- and 4-byte ones: every byte value that UTF-8 uses appears.
    wide = [*range(0x800, 0xD800, 97), *range(0xE000, 0x10000, 97), *range(0x10000, 0x110000, 0x8000)]
    text = "".join(map(chr, range(0x800))) + "".join(map(chr, wide)) + "日本語 🙂 → ü"
    pieces = tok.token_bytes(tok.encode(text))
    assert b"".join(pieces) == text.encode("utf-8")
    assert {b for p in pieces for b in p} == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    # The 256 one-byte tokens of the alphabet are the 256 byte values, those UTF-8 never uses included.
    singles = {b for b in tok.token_bytes(range(tok.vocab_size)) if len(b) == 1}
    assert singles == {bytes([i]) for i in range(256)}
    assert tok.token_bytes([tok.bos_id, tok.end_id]) == [b"<|bos|>", b"<|end|>"]
    with pytest.raises(CrosschipError, match="outside the vocabulary"):
        tok.token_bytes([tok.vocab_size])


def test_digits_are_split_individually(tok: Tokenizer):
    for text in ["1234567890", "x 2024 y", "answer: -849", "3.14159", "007"]:
        strings = tok.token_strings(tok.encode(text))
        digit_tokens = [s for s in strings if any(c.isdigit() for c in s)]
        assert all(len(s) == 1 for s in digit_tokens), strings
        assert "".join(digit_tokens) == "".join(c for c in text if c.isdigit())


def test_prompt_completion_boundary_is_clean(tok: Tokenizer):
    # Training encodes whole problems while serving encodes the prompt and generates the rest.
    for digits in (1, 2, 3):
        for p in generate_problems(200, digits=digits, ops=["+", "-"], seed=1):
            assert tok.encode(p.prompt) + tok.encode(p.completion) == tok.encode(p.text)


def test_special_tokens(tok: Tokenizer):
    assert [tok.bos_id, tok.eos_id, tok.pad_id] == [0, 1, 2]
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]
    # A literal special string is encoded as the special token and dropped by decode.
    ids = tok.encode("done<|eos|>")
    assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
    assert tok.decode(ids) == "done"
    assert tok.decode(ids, skip_special=False) == "done<|eos|>"
    # Near misses stay plain text.
    for text in ["<|eos", "<| eos |>", "<|EOS|>", "|eos|"]:
        ids = tok.encode(text)
        assert not set(ids) & tok.special_ids and tok.decode(ids) == text


@pytest.mark.parametrize("vocab_size", [512, 1024])
def test_default_fits_model_vocab(vocab_size: int):
    tok = default_tokenizer(vocab_size)
    assert tok.vocab_size <= vocab_size
    assert tok.vocab_size == len(tok) and tok.vocab_size > 400
    assert default_tokenizer(vocab_size) is tok  # cached


def test_training_is_deterministic():
    texts = builtin_corpus()[:20] + [p.text for p in generate_problems(300, digits=2, ops=["+", "-"], seed=0)]
    first, second = train_tokenizer(texts, 400), train_tokenizer(list(texts), 400)
    assert first._tok.to_str() == second._tok.to_str()


def test_train_rejects_tiny_vocab():
    with pytest.raises(CrosschipError, match="at least 263"):
        train_tokenizer(["hello"], 100)


def test_chat_template(tok: Tokenizer):
    text = tok.apply_chat_template(CHATS[1][:2])
    assert (
        text
        == "<|bos|><|system|>You add numbers.\nShow the working.<|end|><|user|>What is 243+606? 🤖<|end|><|assistant|>"
    )
    assert tok.apply_chat_template(CHATS[0], add_generation_prompt=False) == "<|bos|><|user|>12+7=<|end|>"
    # OpenAI's `developer` role is the system message.
    assert (
        tok.apply_chat_template(CHATS[2]) == "<|bos|><|system|>Answer briefly.<|end|><|user|>1+1=<|end|><|assistant|>"
    )
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.encode("<|assistant|>")[0] and ids.count(tok.end_id) == 2


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "bot", "content": "x"}], "unknown chat role: bot"),
        ([{"content": "x"}], "role must be a string, got None"),
        ([{"role": "user", "content": ["x"]}], "content must be a string"),
        ([{"role": "user"}], "content must be a string"),
        (["hello"], "expected a dict"),
        ([], "no messages"),
    ],
)
def test_chat_template_errors(tok: Tokenizer, messages, match: str):
    with pytest.raises(CrosschipError, match=match):
        tok.apply_chat_template(messages)


# A template in the style of many published ones: newlines, a loop variable, the EOS token.
EDITED_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
{{ message['role'] | upper }}: {{ message['content'] }}{{ eos_token if not loop.last else '' }}
{% endfor %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""


def test_a_saved_folders_chat_template_is_the_one_rendered(saved, tmp_path):
    """What transformers renders from the folder's tokenizer_config.json, we render too, edits included."""
    directory = tokenizer_with(saved, tmp_path / "edited", chat_template=EDITED_TEMPLATE)
    loaded = Tokenizer.load(directory)
    text = loaded.apply_chat_template(CHATS[2])
    assert text == "<|bos|>\nDEVELOPER: Answer briefly.<|eos|>\nUSER: 1+1=\nASSISTANT:"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for gen in (True, False):
        assert hf.apply_chat_template(CHATS[2], tokenize=False, add_generation_prompt=gen) == (
            loaded.apply_chat_template(CHATS[2], add_generation_prompt=gen)
        )


def test_a_template_using_tojson_and_the_pad_token_renders_as_transformers_renders_it(saved, tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m | tojson(indent=1, sort_keys=True) }}"
        "{% if not loop.last %}{{ pad_token }}{% endif %}{% endfor %}"
        "{{ {'n': messages | length, 'text': '<ü & ß>'} | tojson(separators=(',', ':')) }}"
        "{{ strftime_now('%Y') }}"
    )
    directory = tokenizer_with(saved, tmp_path / "json", chat_template=template)
    chat = [*CHATS[2], {"role": "assistant", "content": "«2» <b>"}]
    text = Tokenizer.load(directory).apply_chat_template(chat)
    assert '"content": "«2» <b>"' in text and '{"n":3,"text":"<ü & ß>"}' in text and text.count("<|pad|>") == 2
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text


@pytest.mark.parametrize(
    "template, match",
    [
        ("{% for m in messages %}{{ m['content'] }", "chat_template does not compile"),
        ([{"name": "default", "template": "x"}], "chat_template must be one template"),
    ],
)
def test_a_bad_chat_template_is_named_when_the_folder_loads(saved, tmp_path, template, match):
    directory = tokenizer_with(saved, tmp_path / "bad", chat_template=template)
    with pytest.raises(CrosschipError, match=match) as e:
        Tokenizer.load(directory)
    assert "tokenizer_config.json" in str(e.value)


def test_a_template_without_bos_or_roles_checks_still_renders_and_refuses_by_raise_exception(saved, tmp_path):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be the user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    directory = tokenizer_with(saved, tmp_path / "strict", chat_template=template)
    loaded = Tokenizer.load(directory)
    assert loaded.apply_chat_template(CHATS[0]) == "12+7="
    with pytest.raises(CrosschipError, match="chat template: the first message must be the user"):
        loaded.apply_chat_template(CHATS[2])
    # A template that fails while it renders is reported as the template's error, not raised as it is.
    broken = Tokenizer.load(tokenizer_with(saved, tmp_path / "broken", chat_template="{{ messages | tojson(x=1) }}"))
    with pytest.raises(CrosschipError, match="chat template: .*unexpected keyword argument 'x'"):
        broken.apply_chat_template(CHATS[0])


def test_save_load_round_trip(tok: Tokenizer, saved):
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert config["model_max_length"] == 512 and "chat_template" in config
    loaded = Tokenizer.load(saved)
    text = "Loaded 243+606= 🤖\n<|eos|>"
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.vocab_size,
    )


def test_save_model_max_length(tok: Tokenizer, tmp_path):
    tok.save(tmp_path, model_max_length=2048)
    assert Tokenizer.load(tmp_path).model_max_length == 2048


def test_load_errors(tmp_path):
    with pytest.raises(CrosschipError, match="tokenizer.json not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CrosschipError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_load_rejects_missing_specials(tmp_path):
    train_tokenizer(["plain text"], 300)._tok.save(str(tmp_path / "ok.json"))
    data = json.loads((tmp_path / "ok.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|pad|>"]
    del data["model"]["vocab"]["<|pad|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CrosschipError, match="<|pad|>"):
        Tokenizer.load(tmp_path)


# --------------------------------------------------------------------------------------------
# transformers loads the same folder and agrees
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizers(saved):
    transformers = pytest.importorskip("transformers")
    return [
        transformers.AutoTokenizer.from_pretrained(saved),
        transformers.PreTrainedTokenizerFast.from_pretrained(saved),
    ]


def test_hf_same_ids_and_text(tok: Tokenizer, hf_tokenizers):
    rng = random.Random(1)
    texts = [_random_text(rng) for _ in range(200)] + builtin_corpus()[:5] + ["a <|eos|> b <|user|>"]
    texts = [t for t in texts if not 0xD800 <= ord(t[-1]) <= 0xDFFF]
    for hf in hf_tokenizers:
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert len(hf) == tok.vocab_size
        for text in texts:
            ids = tok.encode(text)
            assert hf(text, add_special_tokens=False)["input_ids"] == ids
            # transformers' default prepends BOS, like add_bos=True.
            assert hf(text)["input_ids"] == tok.encode(text, add_bos=True)
            assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
            assert hf.decode(ids) == tok.decode(ids, skip_special=False)


def test_hf_chat_template_matches(tok: Tokenizer, hf_tokenizers):
    for hf in hf_tokenizers:
        for messages in CHATS:
            for gen in (True, False):
                ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
                assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == ours
        with pytest.raises(Exception, match="unknown chat role"):
            hf.apply_chat_template([{"role": "bot", "content": "x"}], tokenize=False)
        # Role markers are special for transformers too: decode drops them.
        ids = tok.encode(tok.apply_chat_template(CHATS[0]))
        assert hf.decode(ids, skip_special_tokens=True) == "12+7="
