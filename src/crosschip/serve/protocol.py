"""OpenAI API shapes: request parsing (each bad value names its parameter) and response bodies.

Kept apart from the HTTP layer so the same parsing serves both endpoints and the tests can
read the shapes in one place.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from crosschip.errors import CrosschipError
from crosschip.serve.sampling import MAX_LOGPROBS, InvalidParameter, SamplingParams, TokenLogprob, check_token_ids

_MISSING = object()


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, *, nullable: bool = True) -> Any:
    """body[name] checked against `kinds`; bool is not accepted as a number. An integer field
    takes a float with no fractional part (`3.0`), as vLLM's pydantic models do."""
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return default
    if int in kinds and float not in kinds and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(
            "number"
            if k is float
            else {int: "integer", str: "string", bool: "boolean", list: "array", dict: "object"}.get(k, k.__name__)
            for k in kinds
        )
        raise InvalidParameter(
            name, f"{name}: expected {names}, got {type(value).__name__ if value is not None else 'null'}"
        )
    return value


def _number(body: dict, name: str, default: float) -> float:
    return float(_get(body, name, (int, float), default))


def _stop(body: dict) -> list[str]:
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise InvalidParameter("stop", "stop: expected a string or an array of strings")
    return stop


def _int_list(body: dict, name: str, default: list[int] | None = None) -> list[int] | None:
    v = _get(body, name, (list,), default)
    if v is not None and not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise InvalidParameter(name, f"{name}: expected an array of integers")
    return v


def _logit_bias(body: dict) -> dict[int, float]:
    """`logit_bias`: {"token id": bias}. JSON object keys are strings, so ids come as "42"."""
    raw = _get(body, "logit_bias", (dict,), {})
    bias = {}
    for key, value in raw.items():
        # Digits only: int() would also take " 7", "1_0" and other scripts' digits.
        if not re.fullmatch(r"-?[0-9]+", key):
            raise InvalidParameter("logit_bias", f"logit_bias: keys must be token ids, got {key!r}")
        if len(key.lstrip("-")) > 18:  # no vocabulary's id (and past 4300 digits int() refuses it)
            raise InvalidParameter("logit_bias", f"logit_bias: token id {key[:20]}... is outside the vocabulary")
        token = int(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidParameter("logit_bias", f"logit_bias: the bias of token {key} must be a number")
        bias[token] = float(value)
    return bias


# vLLM's request fields that constrain the output in ways this server does not implement.
VLLM_CONSTRAINTS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "bad_words",
    "use_beam_search",
)


# vLLM's extra fields that change what a client gets back, with the value that changes nothing:
# any other value is refused by name rather than ignored.
VLLM_EXTRAS = {
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "prompt_logprobs": None,
    "truncate_prompt_tokens": None,
    "continue_final_message": False,
    "chat_template": None,
    "chat_template_kwargs": None,
    "documents": None,
    "logits_processors": None,
    "return_token_ids": False,
    "prompt_embeds": None,
    "priority": 0,
}


def refuse_unsupported(body: dict, *, chat: bool) -> None:
    """Features a client relies on that this server does not implement get a 400 naming them,
    not silence: a client that asked for JSON or a tool call must not take free text for it."""
    for name in VLLM_CONSTRAINTS:
        if body.get(name):
            raise InvalidParameter(name, f"{name}: not supported")
    for name, neutral in VLLM_EXTRAS.items():
        value = body.get(name)
        if value not in (None, neutral, {}, []):
            raise InvalidParameter(name, f"{name}: not supported (only {json.dumps(neutral)} is)")
    # Both endpoints: vLLM's completions take response_format too, and tools sent anywhere
    # ask for a tool call.
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise InvalidParameter("response_format", 'response_format: only {"type": "text"} is supported')
    _check_tool_choice(body)
    if not chat:
        if _get(body, "suffix", (str,), None):
            raise InvalidParameter("suffix", "suffix: not supported")
        return
    if body.get("echo"):
        raise InvalidParameter("echo", "echo: not supported in chat (completions echo the prompt)")
    for legacy in ("functions", "function_call"):
        if body.get(legacy):
            raise InvalidParameter(legacy, f"{legacy}: not supported")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise InvalidParameter("modalities", 'modalities: only ["text"] is supported')
    if body.get("audio") is not None:
        raise InvalidParameter("audio", "audio: audio output is not supported")


def _check_tool_choice(body: dict) -> None:
    """Tools are refused unless tool_choice is "none"; a tool_choice asks for tools, so without
    them it is refused as OpenAI and vLLM refuse it, not answered with free text."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
    if choice is not None and choice not in ("none", "auto", "required") and not named:
        raise InvalidParameter(
            "tool_choice", 'tool_choice: expected "none", "auto", "required" or {"type": "function", "function": {...}}'
        )
    if tools and choice != "none":
        raise InvalidParameter("tools", 'tools: tool calls are not supported (tool_choice "none" is)')
    if not tools and choice not in (None, "none"):
        raise InvalidParameter("tool_choice", "tool_choice: only allowed when tools are given")


def sampling_params(body: dict, *, chat: bool) -> SamplingParams:
    """SamplingParams from an OpenAI request body; raises InvalidParameter naming the field."""
    refuse_unsupported(body, chat=chat)
    if chat:
        # `max_completion_tokens` is the current name and wins over the deprecated `max_tokens` (as in vLLM).
        max_tokens = _get(body, "max_tokens", (int,), None)
        max_tokens = _get(body, "max_completion_tokens", (int,), max_tokens)
        max_tokens_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        want_logprobs = _get(body, "logprobs", (bool,), False)
        top = _get(body, "top_logprobs", (int,), None)
        if top is not None and not want_logprobs:
            raise InvalidParameter("top_logprobs", "top_logprobs: requires logprobs to be true")
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise InvalidParameter("top_logprobs", f"top_logprobs: must be between 0 and {MAX_LOGPROBS}, got {top}")
        logprobs = (top or 0) if want_logprobs else None
        prompt_logprobs, echo = None, False
    else:
        # Absent: OpenAI's 16. An explicit null: up to the model's context, as vLLM reads it.
        max_tokens = _get(body, "max_tokens", (int,), None) if "max_tokens" in body else 16
        max_tokens_param = "max_tokens"
        logprobs = _get(body, "logprobs", (int,), None)
        echo = _get(body, "echo", (bool,), False)
        prompt_logprobs = logprobs if echo and logprobs is not None else None
    _get(body, "user", (str,))  # the caller's id for abuse tracking: unused here, but typed as OpenAI types it
    n = _get(body, "n", (int,), 1)
    best_of = _get(body, "best_of", (int,), None)
    if best_of is not None and best_of != n:
        raise InvalidParameter("best_of", "best_of: only best_of == n is supported")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_get(body, "top_k", (int,), -1),
        min_p=_number(body, "min_p", 0.0),
        seed=_get(body, "seed", (int,), None),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids", []),
        logit_bias=_logit_bias(body),
        allowed_token_ids=_int_list(body, "allowed_token_ids"),
        min_tokens=_get(body, "min_tokens", (int,), 0),
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
        n=n,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        echo=echo,
        max_tokens_param=max_tokens_param,
    )


def completion_prompts(body: dict, tokenizer, context: int | None = None) -> list[list[int]]:
    """The ids of `prompt`: a string, an array of strings, an array of token ids, or an array
    of those. Text gets `<|bos|>` first unless `add_special_tokens` is false (as in vLLM);
    ids are taken as they are. Text too long for `context` is refused untokenized."""
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise InvalidParameter("prompt", "prompt: required")
    add_bos = _get(body, "add_special_tokens", (bool,), True)
    if isinstance(prompt, str):
        return [encode_text(tokenizer, prompt, "prompt", add_bos=add_bos, context=context)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return [encode_text(tokenizer, p, "prompt", add_bos=add_bos, context=context) for p in prompt]
        if all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt
        ):
            return list(prompt)
    raise InvalidParameter("prompt", "prompt: expected a string, an array of strings or an array of token ids")


def chat_messages(body: dict) -> list[dict[str, str]]:
    """`messages` with string content (an array of text parts is joined by newlines)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages", "messages: expected a non-empty array of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidParameter("messages", f"messages[{i}]: expected an object with 'role' and 'content'")
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""  # an assistant turn that only called tools, as OpenAI sends it back
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise InvalidParameter("messages", f"messages[{i}].content: only text parts are supported")
            content = "\n".join(texts)  # as vLLM joins them
        if not isinstance(content, str):
            raise InvalidParameter("messages", f"messages[{i}].content: expected a string")
        out.append({"role": m["role"], "content": content})
    return out


def chat_prompt_ids(body: dict, tokenizer, context: int | None = None) -> list[int]:
    """The ids of `messages` rendered by the bundle's chat template (it holds `<|bos|>` itself),
    with the assistant's header unless `add_generation_prompt` is false, and one more `<|bos|>`
    in front with `add_special_tokens` (vLLM's extra fields, as vLLM reads them). Text too long
    for `context` is refused untokenized."""
    messages = chat_messages(body)
    add_generation_prompt = _get(body, "add_generation_prompt", (bool,), True)
    add_bos = _get(body, "add_special_tokens", (bool,), False)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except CrosschipError as e:  # an unknown role
        raise InvalidParameter("messages", f"messages: {e}") from None
    return encode_text(tokenizer, text, "messages", add_bos=add_bos, context=context)


def encode_text(tokenizer, text: str, param: str, *, add_bos: bool, context: int | None = None) -> list[int]:
    """The ids of `text`; text that is not Unicode is refused by `param`. JSON's "\\ud800"
    decodes to a lone surrogate, which the tokenizer rejects with a TypeError. With the model's
    `context`, a text too long to fit it is refused before it is tokenized."""
    if context is not None and (most := tokenizer.max_token_chars) is not None and len(text) > context * most:
        raise InvalidParameter(
            param, f"{param}: {len(text):,} characters are more tokens than the model's context of {context} holds"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameter(
            param, f"{param}: not valid Unicode (a lone surrogate, {text[e.start]!r}, at character {e.start})"
        ) from None
    return tokenizer.encode(text, add_bos=add_bos)


@dataclass(frozen=True)
class Echo:
    """What completions' `echo` puts before a choice's text: the prompt as the client sent it,
    as vLLM echoes it. A text prompt comes back verbatim, special-token strings included, less
    the `<|bos|>` the server put before it (`hidden` ids); a prompt of ids comes back decoded
    with its special tokens, as `/detokenize` shows them."""

    hidden: int

    @classmethod
    def of(cls, body: dict) -> Echo | None:
        if not body.get("echo"):
            return None
        prompt = body.get("prompt")
        text = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        return cls(int(text and _get(body, "add_special_tokens", (bool,), True)))

    def text(self, tokenizer, prompt_ids: list[int]) -> str:
        # Exact: the tokenizer round-trips every string once special tokens are kept.
        return tokenizer.decode(prompt_ids[self.hidden :], skip_special=False)


def tokenize_response(body: dict, tokenizer, max_model_len: int) -> dict:
    """vLLM's `/tokenize` answer: the ids, their count, the context length, and with
    `return_token_strs` each token's text."""
    ids = tokenize_ids(body, tokenizer)
    out = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
    if _get(body, "return_token_strs", (bool,), False):
        out["token_strs"] = tokenizer.token_strings(ids)
    return out


def tokenize_ids(body: dict, tokenizer) -> list[int]:
    """vLLM's `/tokenize`: the ids a completions `prompt` (string) or a chat's `messages` becomes,
    exactly as the two endpoints encode them."""
    if "messages" in body:
        refuse_unsupported(body, chat=True)  # what the chat endpoint would refuse, not ids it never sends
        return chat_prompt_ids(body, tokenizer)
    if not isinstance(body.get("prompt"), str):
        raise InvalidParameter("prompt", "prompt: required (a string), or messages")
    return completion_prompts(body, tokenizer)[0]


def detokenize_ids(body: dict, vocab_size: int) -> list[int]:
    """vLLM's `/detokenize`: `tokens`, an array of ids in the vocabulary."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidParameter("tokens", "tokens: expected an array of token ids")
    check_token_ids(tokens, vocab_size, "tokens")
    return tokens


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


@dataclass
class Envelope:
    """The fields every response and chunk of one request share."""

    id: str
    object: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, obj: str, model: str) -> Envelope:
        return cls(f"{prefix}-{uuid.uuid4().hex}", obj, int(time.time()), model)

    def body(self, **fields: Any) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, **fields}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class LogprobFormatter:
    """Token strings for logprob bodies; completions and chat use different shapes.

    With vLLM's `return_tokens_as_token_ids` every token is named `token_id:N` instead of by
    its text: several ids of a byte-level BPE share a display string (each lone piece of a
    multi-byte character shows as U+FFFD), and a completions `top_logprobs` object keeps one
    entry per string, so only ids let a client (`crosschip verify --target-url`) tell them apart."""

    def __init__(self, tokenizer, *, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids

    @classmethod
    def for_request(cls, body: dict, tokenizer) -> LogprobFormatter:
        return cls(tokenizer, as_ids=_get(body, "return_tokens_as_token_ids", (bool,), False))

    def token(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tokenizer.token_strings([token_id])[0]

    def completion(
        self,
        entries: list[TokenLogprob | None],
        token_ids: list[int],
        before: list[int] = (),
        echo: Echo | None = None,
        prompt_len: int = 0,
    ) -> dict:
        """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} (legacy completions shape).

        `before`: the ids this choice's text already holds (streamed chunks, the echoed prompt).
        A token's `text_offset` is the length of the text up to it: the first `prompt_len` ids
        are the prompt as `echo` shows it, the rest decoded as the engine decodes a completion,
        so special tokens add nothing there and a character that several byte tokens carry
        counts once.
        """
        shown = prompt_len if echo is not None else 0

        def text_len(ids: list[int]) -> int:
            head = echo.text(self.tokenizer, ids[:shown]) if shown else ""
            return len(head) + len(self.tokenizer.decode(ids[shown:]))

        offsets = [text_len([*before, *token_ids[:t]]) for t in range(len(token_ids))]
        return {
            "tokens": [self.token(t) for t in token_ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else self._top(e) for e in entries],
            "text_offset": offsets,
        }

    def _top(self, e: TokenLogprob) -> dict[str, float]:
        """The k most likely tokens and the chosen one, so up to logprobs + 1 entries (OpenAI's
        rule). Where the chosen token's string is one of the top k's, that entry stays."""
        row = {self.token(i): lp for i, lp in e.top}
        row.setdefault(self.token(e.token_id), e.logprob)
        return row

    def chat(self, entries: list[TokenLogprob]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            # `bytes` are the token's own, so a client can join the pieces of a character
            # that spans tokens (its `token` alone shows U+FFFD).
            raw = self.tokenizer.token_bytes([token_id])[0]
            return {"token": self.token(token_id), "logprob": logprob, "bytes": list(raw)}

        return {
            "content": [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries
            ]
        }
