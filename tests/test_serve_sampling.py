"""Sampling: the logits processors, seeds, penalties and stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from crosschip.serve.sampling import (
    InvalidParameter,
    SamplingParams,
    apply_penalties,
    apply_repetition_penalty,
    find_stop,
    make_generator,
    min_p_mask,
    request_bias,
    sample,
    stream_safe_end,
    token_logprob,
    top_k_mask,
    top_p_mask,
)


def kept(x: torch.Tensor) -> list[int]:
    return torch.isfinite(x).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    assert kept(top_k_mask(logits, 2)) == [1, 3]
    assert kept(top_k_mask(logits, -1)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert kept(top_p_mask(logits, 0.5)) == [0]
    assert kept(top_p_mask(logits, 0.8)) == [0, 1]
    assert kept(top_p_mask(logits, 0.81)) == [0, 1, 2]
    assert kept(top_p_mask(logits[[3, 2, 1, 0]], 0.8)) == [2, 3]  # order of the vocabulary does not matter


def test_min_p_is_relative_to_the_top_token():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert kept(min_p_mask(probs.log(), 0.3)) == [0, 1, 2]  # 0.15 >= 0.3 * 0.5
    assert kept(min_p_mask(probs.log(), 0.5)) == [0, 1]


def test_penalties_follow_the_openai_formula():
    logits = torch.zeros(4)
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [0.0, -0.75, -1.25, 0.0]


def test_repetition_penalty_follows_vllm_over_prompt_and_output():
    logits = torch.tensor([2.0, -2.0, 1.0, 3.0])
    counts = torch.tensor([0.0, 1.0, 0.0, 0.0])
    in_prompt = torch.tensor([True, False, False, False])
    assert apply_repetition_penalty(logits, counts, in_prompt, 2.0).tolist() == [1.0, -4.0, 1.0, 3.0]
    assert apply_repetition_penalty(logits, None, in_prompt, 2.0).tolist() == [1.0, -2.0, 1.0, 3.0]
    assert apply_repetition_penalty(logits, counts, in_prompt, 1.0) is logits


def test_a_penalty_changes_the_greedy_choice():
    logits = torch.tensor([1.0, 0.9, 0.0])
    counts = torch.tensor([2.0, 0.0, 0.0])
    params = SamplingParams(temperature=0, frequency_penalty=0.1)
    assert sample(logits, params, counts, make_generator(0)) == 1
    assert sample(logits, SamplingParams(temperature=0), counts, make_generator(0)) == 0


@pytest.mark.parametrize(
    ("temperature", "repetition_penalty"), [(1e-45, 1.0), (1e-300, 1.0), (1.0, 1e-300), (1e-45, 1e-300)]
)
def test_extreme_temperature_or_penalty_samples_the_likeliest_token(temperature, repetition_penalty):
    """Both overflowed the logits to inf, softmax to NaN, and torch.multinomial raised: the
    engine step failed, and with it every request in flight. A temperature under 0.01 samples at
    0.01, as vLLM's; an overflowed logit counts as the largest finite one."""
    logits = torch.tensor([1.0, 3.0, -2.0, 0.5])
    in_prompt = torch.tensor([False, True, False, False])
    params = SamplingParams(temperature=temperature, repetition_penalty=repetition_penalty)
    params.validate()
    assert [sample(logits, params, None, make_generator(s), None, in_prompt) for s in range(5)] == [1] * 5


def test_a_seed_reproduces_the_draws_and_different_seeds_differ():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        g = make_generator(seed)
        return [sample(logits, params, None, g) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_request_bias_adds_logit_bias_and_masks_outside_allowed_and_banned_ids():
    p = SamplingParams(logit_bias={1: 2.5, 3: -100.0})
    assert request_bias(p, 5).tolist() == [0.0, 2.5, 0.0, -100.0, 0.0]
    assert request_bias(SamplingParams(), 5) is None
    p = SamplingParams(logit_bias={1: 2.5, 4: 1.0}, allowed_token_ids=[1, 2])
    assert request_bias(p, 5).tolist() == [-math.inf, 2.5, 0.0, -math.inf, -math.inf]
    assert request_bias(p, 5, banned={2}).tolist() == [-math.inf, 2.5, -math.inf, -math.inf, -math.inf]
    with pytest.raises(InvalidParameter) as e:
        request_bias(p, 5, banned={1, 2})
    assert e.value.param == "min_tokens"


def test_the_bias_comes_before_penalties_and_decides_greedy_and_sampled_draws():
    logits = torch.tensor([3.0, 1.0, 0.0, 2.0])
    p = SamplingParams(temperature=0, logit_bias={1: 2.5}, presence_penalty=1.0)
    assert not p.plain_greedy  # the batched argmax would skip the bias
    assert sample(logits, p, None, make_generator(0), request_bias(p, 4)) == 1
    counts = torch.tensor([0.0, 1.0, 0.0, 0.0])  # token 1 already out: 3.5 - 1 < 3.0
    assert sample(logits, p, counts, make_generator(0), request_bias(p, 4)) == 0
    p = SamplingParams(temperature=1.0, allowed_token_ids=[2])
    g = make_generator(0)
    assert {sample(logits, p, None, g, request_bias(p, 4)) for _ in range(50)} == {2}


def test_seeds_in_64_bits_are_taken_and_others_refused_by_name():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(2))
    for seed in (-(2**63), 2**64 - 1):
        for choice in (0, 3):
            sample(logits, SamplingParams(temperature=1.0, seed=seed), None, make_generator(seed, choice))
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(InvalidParameter) as e:
            SamplingParams(seed=seed)
        assert e.value.param == "seed"


def test_sampling_respects_the_masks():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    g = make_generator(0)
    seen = {sample(logits, SamplingParams(temperature=2.0, top_k=2), None, g) for _ in range(200)}
    assert seen == {0, 1}


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0])
    lp = token_logprob(logits, 1, top=2)
    expected = logits.log_softmax(-1)
    assert math.isclose(lp.logprob, float(expected[1]), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [0, 1]


def test_stop_string_split_across_tokens_is_found_when_completed():
    stops = ["END"]
    text = "abc E"  # "E" arrived; "ND" will come with the next token
    assert find_stop(text, stops, start=4) == (-1, None)
    assert stream_safe_end(text, stops) == 4  # the "E" is held back, it may start "END"
    text2 = text + "ND more"
    assert find_stop(text2, stops, start=len(text)) == (4, "END")
    assert stream_safe_end("abc x", stops) == 5
    # The earliest stop wins; at one index, the first listed.
    assert find_stop("x 12 ab", ["ab", "12", "1"], start=0) == (2, "12")


def test_the_held_back_tail_is_the_longest_one_that_may_grow_into_a_stop():
    """Against the definition (every k tried): the fast search compares only the k whose
    stop prefix ends in the text's last character."""
    import random

    def by_definition(text: str, stops: list[str]) -> int:
        end = len(text.rstrip("\ufffd"))
        for stop in stops:
            end -= next((k for k in range(min(len(stop) - 1, end), 0, -1) if text[:end].endswith(stop[:k])), 0)
        return end

    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab\ufffd") for _ in range(rng.randrange(0, 12)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 8))) for _ in range(rng.randrange(1, 4))]
        assert stream_safe_end(text, stops) == by_definition(text, stops), (text, stops)


def test_stream_holds_back_a_split_utf8_character():
    assert stream_safe_end("ab\ufffd", []) == 2


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", -2),
        ("min_p", 1.5),
        ("n", 0),
        ("max_tokens", 0),
        ("logprobs", 21),
        ("logit_bias", {3: 100.5}),
        ("logit_bias", {3: math.nan}),
        ("allowed_token_ids", []),
        ("min_tokens", -1),
        ("min_tokens", 17),
        ("repetition_penalty", 0.0),
    ],
)
def test_invalid_parameters_name_themselves(field, value):
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field
    assert field in str(e.value)
