"""The arithmetic task (format, splits, checker) and the text corpus (loading, packing)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from crosschip.config import DataConfig
from crosschip.data import (
    Problem,
    builtin_corpus,
    check,
    generate_problems,
    heldout_set,
    iter_problems,
    load_texts,
    pack_documents,
    parse_answer,
)
from crosschip.data.arith import split_of
from crosschip.errors import CrosschipError

OP_SETS = [["+"], ["-"], ["+", "-"]]

# --------------------------------------------------------------------------------------------
# Arithmetic: format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, op, b, text",
    [
        (243, "+", 606, "243+606=3+6+0=9 c0 9|4+0+0=4 c0 49|2+6+0=8 c0 849|answer: 849"),
        (606, "-", 243, "606-243=6-3-0=3 b0 3|0-4-0=6 b1 63|6-2-1=3 b0 363|answer: 363"),
        (243, "-", 606, "243-606=-(606-243)|6-3-0=3 b0 3|0-4-0=6 b1 63|6-2-1=3 b0 363|answer: -363"),
        (7, "+", 243, "7+243=7+3+0=0 c1 0|0+4+1=5 c0 50|0+2+0=2 c0 250|answer: 250"),
        (995, "+", 8, "995+8=5+8+0=3 c1 3|9+0+1=0 c1 03|9+0+1=0 c1 003|answer: 1003"),
        (100, "-", 99, "100-99=0-9-0=1 b1 1|0-9-1=0 b1 01|1-0-1=0 b0 001|answer: 1"),
        (5, "-", 5, "5-5=5-5-0=0 b0 0|answer: 0"),
        (3, "-", 80, "3-80=-(80-3)|0-3-0=7 b1 7|8-0-1=7 b0 77|answer: -77"),
    ],
)
def test_exact_format(a: int, op: str, b: int, text: str):
    p = Problem(a, op, b)
    assert p.text == text and p.prompt + p.completion == text
    assert p.prompt == f"{a}{op}{b}=" and p.answer == eval(f"{a}{op}{b}")


_STEP = re.compile(r"(\d)([+-])(\d)[+-](\d)=(\d) [cb](\d) (\d+)\|")


def _replay(p: Problem) -> int:
    """Recompute the answer from the written steps alone, checking each step's arithmetic."""
    working = p.completion.rsplit("answer:", 1)[0]
    steps = _STEP.findall(working)
    assert "".join(m.group(0) for m in _STEP.finditer(working)) == working.split(")|")[-1]
    digits, carry = [], 0
    for x, op, y, c_in, d, c_out, running in steps:
        x, y, c_in, d, c_out = map(int, (x, y, c_in, d, c_out))
        assert c_in == carry
        value = x + y + c_in if op == "+" else x - y - c_in
        assert (d, c_out) == ((value % 10, value // 10) if op == "+" else (value % 10, int(value < 0)))
        digits.append(d)
        assert running == "".join(map(str, reversed(digits)))  # this digit in front of the last result
        carry = c_out
    magnitude = int("".join(map(str, reversed(digits)))) + (carry * 10 ** len(digits) if p.op == "+" else 0)
    return -magnitude if working.startswith("-(") else magnitude


def test_every_two_digit_problem_is_worked_correctly():
    for op in ("+", "-"):
        for a in range(100):
            for b in range(100):
                p = Problem(a, op, b)
                assert _replay(p) == p.answer
                assert parse_answer(p.completion) == p.answer and check(p, p.completion)


def test_three_digit_sample_is_worked_correctly():
    for p in generate_problems(3000, digits=3, ops=["+", "-"], seed=3):
        assert _replay(p) == p.answer and check(p, p.completion)
        assert p.completion.count("|") == max(len(str(p.a)), len(str(p.b))) + (p.op == "-" and p.a < p.b)


def test_problem_validation():
    for args in [(1, "*", 2), (-1, "+", 2), (1, "+", 2.0), (True, "+", 1)]:
        with pytest.raises(CrosschipError):
            Problem(*args)


# --------------------------------------------------------------------------------------------
# Arithmetic: sampling and splits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("digits", [1, 2, 3])
@pytest.mark.parametrize("ops", OP_SETS)
def test_every_op_and_digit_combo(digits: int, ops: list[str]):
    problems = generate_problems(2000, digits=digits, ops=ops, seed=0)
    assert len(problems) == 2000
    assert {p.op for p in problems} == set(ops)
    lengths = {len(str(n)) for p in problems for n in (p.a, p.b)}
    assert lengths == set(range(1, digits + 1))  # short and long operands both appear
    assert all(0 <= n < 10**digits for p in problems for n in (p.a, p.b))
    if "-" in ops:
        assert any(p.answer < 0 for p in problems) and any(p.answer > 0 for p in problems)
    assert all(check(p, p.completion) for p in problems)


def test_deterministic_by_seed():
    kwargs = dict(digits=3, ops=["+", "-"])
    assert generate_problems(500, seed=7, **kwargs) == generate_problems(500, seed=7, **kwargs)
    assert generate_problems(500, seed=7, **kwargs) != generate_problems(500, seed=8, **kwargs)
    # The op order given does not change the stream; the stream extends generate_problems.
    assert generate_problems(50, digits=2, ops=["-", "+"], seed=1) == generate_problems(50, digits=2, ops="+-", seed=1)
    stream = iter_problems(seed=7, split="train", **kwargs)
    assert [next(stream) for _ in range(500)] == generate_problems(500, seed=7, **kwargs)


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_heldout_never_overlaps_train(digits: int):
    ops = ["+", "-"]
    train = set()
    for seed in (0, 1):
        train.update(generate_problems(20_000, digits=digits, ops=ops, seed=seed))
    if digits < 3:  # all held-out problems
        universe = [Problem(a, op, b) for op in ops for a in range(10**digits) for b in range(10**digits)]
        heldout = {p for p in universe if split_of(p.a, p.op, p.b) == "heldout"}
        assert 0.04 < len(heldout) / len(universe) < 0.16  # about HELDOUT_PERCENT
        assert set(generate_problems(len(heldout), digits=digits, ops=ops, seed=0, split="heldout")) == heldout
    else:
        heldout = set(generate_problems(5000, digits=digits, ops=ops, seed=5, split="heldout"))
    assert heldout and not train & heldout
    assert all(split_of(p.a, p.op, p.b) == "train" for p in train)


def test_heldout_is_distinct_and_sized():
    problems = generate_problems(1000, digits=2, ops=["+", "-"], seed=0, split="heldout")
    assert len(set(problems)) == 1000
    assert problems == generate_problems(1000, digits=2, ops=["+", "-"], seed=0, split="heldout")
    cfg = DataConfig(digits=3, heldout_size=200, seed=4)
    assert len(set(heldout_set(cfg))) == 200


def test_heldout_too_large_is_a_clear_error():
    with pytest.raises(CrosschipError, match=r"only \d+ distinct held-out problems exist for digits=1"):
        heldout_set(DataConfig(digits=1, ops=["+"], heldout_size=500))


@pytest.mark.parametrize("n", [100_000, 100_000_000])
def test_a_heldout_size_past_the_split_is_refused_before_drawing(monkeypatch, n):
    """Drawing found out only after 20 n draws: 82 s for 100,000 2-digit problems (of 2,049),
    hours for data.heldout_size = 100000000 or `verify --problems` as large."""
    import crosschip.data.arith as arith

    def no_draws(**kwargs):
        raise AssertionError("drew problems before counting the held-out split")
        yield

    monkeypatch.setattr(arith, "iter_problems", no_draws)
    with pytest.raises(CrosschipError, match=rf"asked for {n} held-out problems, but only 2049 distinct"):
        generate_problems(n, digits=2, ops=["+", "-"], seed=0, split="heldout")


@pytest.mark.parametrize(
    "kwargs",
    [dict(digits=0), dict(digits=4), dict(ops=["*"]), dict(ops=[]), dict(split="test")],
)
def test_bad_generator_args(kwargs):
    args = {**dict(digits=2, ops=["+"], seed=0), **kwargs}
    with pytest.raises(CrosschipError):
        generate_problems(10, **args)


# --------------------------------------------------------------------------------------------
# Arithmetic: scoring
# --------------------------------------------------------------------------------------------


def test_checker_accepts_continuations():
    p = Problem(243, "-", 606)
    good = p.completion
    for tail in ["", "\n", "\ngarbage answer: 5", "<|eos|>", "<|end|>12+4=", "|", "\n\n999"]:
        assert check(p, good + tail), tail
    assert check(p, "answer: 5|answer: -363")  # the last answer counts
    assert check(p, "answer: -363")  # the working is not scored


def test_checker_rejects_wrong_and_garbled():
    p = Problem(243, "-", 606)
    working = p.completion.rsplit("answer:", 1)[0]
    for answer in ["363", "-362", "-3630", "-0363", "- 363", "-363x", "-363 ", "-36 3", "", "-", "+363", "-363.0"]:
        assert not check(p, f"{working}answer: {answer}"), answer
    assert not check(p, working)
    assert not check(p, "")
    assert not check(p, p.completion.replace("answer", "answr"))
    # Only text before the first end marker counts.
    assert not check(p, "answer: 1\nanswer: -363")
    assert not check(p, "answer: 1<|eos|>answer: -363")


def test_parse_answer():
    assert parse_answer("x|answer: 849") == 849
    assert parse_answer("answer:-12") == -12
    assert parse_answer("answer: 0") == 0
    assert parse_answer("answer: 1|answer: 2\n") == 2
    for text in ["", "answer:", "answer: -0", "answer: 012", "answer: 12a", "the answer is 12"]:
        assert parse_answer(text) is None, text


# --------------------------------------------------------------------------------------------
# Corpus: loading
# --------------------------------------------------------------------------------------------


def test_load_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nstill first\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "second"})
        + "\n\n"
        + json.dumps({"text": "  "})
        + "\n"
        + json.dumps({"text": "third 🤖"})
        + "\n"
    )
    (tmp_path / "sub" / "ignored.md").write_text("not a corpus file")
    (tmp_path / "blank.txt").write_text("  \n")
    assert load_texts([tmp_path]) == ["first document\n\nstill first\n", "second", "third 🤖"]
    # The first documents only (verify, the serving smoke): files past them are not read.
    assert load_texts([tmp_path], limit=2) == ["first document\n\nstill first\n", "second"]
    assert load_texts([tmp_path / "a.txt", tmp_path / "not-read.txt"], limit=1) == ["first document\n\nstill first\n"]
    assert load_texts([tmp_path / "sub" / "b.jsonl", str(tmp_path / "a.txt")])[0] == "second"


def test_load_errors(tmp_path):
    with pytest.raises(CrosschipError, match="path not found: .*missing.txt"):
        load_texts([tmp_path / "missing.txt"])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CrosschipError, match="unsupported file type '.csv'"):
        load_texts([tmp_path / "data.csv"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(CrosschipError, match=r"bad.jsonl:2: invalid JSON"):
        load_texts([bad])
    bad.write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    with pytest.raises(CrosschipError, match=r"bad.jsonl:3: expected an object"):
        load_texts([bad])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("\n")
    with pytest.raises(CrosschipError, match="no non-empty documents"):
        load_texts([tmp_path / "empty"])
    with pytest.raises(CrosschipError, match="no non-empty documents"):
        load_texts([])
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(CrosschipError, match="not valid UTF-8"):
        load_texts([tmp_path / "latin1.txt"])


def test_builtin_corpus():
    docs = builtin_corpus()
    assert len(docs) > 50 and all(doc.strip() == doc and doc for doc in docs)
    assert 30_000 < sum(len(d) for d in docs) < 100_000
    assert docs == builtin_corpus()


# --------------------------------------------------------------------------------------------
# Corpus: packing
# --------------------------------------------------------------------------------------------


def test_pack_documents_layout():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [], [16]]
    packed = pack_documents(docs, 4, pad_id=0)
    assert len(packed) == 5
    for t in (packed.input_ids, packed.doc_ids, packed.positions):
        assert t.shape == (5, 4) and t.dtype == torch.int64
    assert packed.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9], [10, 11, 12, 13], [14, 15, 16, 0]]
    assert packed.doc_ids.tolist() == [[0, 0, 0, -1], [1, 1, -1, -1], [2, 2, 2, 2], [2, 2, 2, 2], [2, 2, 4, -1]]
    assert packed.positions.tolist() == [[0, 1, 2, 0], [0, 1, 0, 0], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 0]]
    assert packed.labels().tolist() == [
        [2, 3, -100, -100],
        [5, -100, -100, -100],
        [7, 8, 9, -100],
        [11, 12, 13, -100],
        [15, -100, -100, -100],
    ]


def test_pack_documents_invariants():
    import random

    rng = random.Random(0)
    docs = [[rng.randrange(1, 500) for _ in range(rng.randint(0, 70))] for _ in range(300)]
    seq_len = 32
    packed = pack_documents(docs, seq_len, pad_id=499)
    # Every token is placed once, in order, and padding carries pad_id.
    real = packed.doc_ids >= 0
    assert packed.input_ids[real].tolist() == [t for d in docs for t in d]
    assert (packed.input_ids[~real] == 499).all() and (packed.positions[~real] == 0).all()
    for row in range(len(packed)):
        ids, pos = packed.doc_ids[row].tolist(), packed.positions[row].tolist()
        pieces = [d for d in dict.fromkeys(ids) if d >= 0]
        assert ids[: len(ids) - ids.count(-1)] == [d for d in pieces for _ in range(ids.count(d))]  # contiguous
        for d in pieces:
            assert [p for i, p in zip(ids, pos) if i == d] == list(range(ids.count(d)))  # restarts at 0
    same = pack_documents(docs, seq_len, pad_id=499)
    assert torch.equal(same.input_ids, packed.input_ids) and torch.equal(same.doc_ids, packed.doc_ids)


def test_pack_documents_edge_cases():
    assert pack_documents([], 8, pad_id=0).input_ids.shape == (0, 8)
    assert pack_documents([[]], 8, pad_id=0).input_ids.shape == (0, 8)
    with pytest.raises(CrosschipError, match="seq_len"):
        pack_documents([[1]], 0, pad_id=0)
