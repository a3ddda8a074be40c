"""A synthetic, verifiable arithmetic-reasoning task: addition and subtraction with a scratchpad.

A problem is `a OP b` with non-negative operands of 1 to `digits` digits. The prompt is the
plain expression (`"243+606="`); the completion works the sum out one digit column at a time,
least significant column first, and ends with `answer: N`. Every step only needs numbers
written close to it, so a tiny transformer can learn the task in minutes:

    243+606=3+6+0=9 c0 9|4+0+0=4 c0 49|2+6+0=8 c0 849|answer: 849
    606-243=6-3-0=3 b0 3|0-4-0=6 b1 63|6-2-1=3 b0 363|answer: 363
    243-606=-(606-243)|6-3-0=3 b0 3|0-4-0=6 b1 63|6-2-1=3 b0 363|answer: -363

A step `x+y+c=s cK R` adds the column digits and the carry in, writes the digit `s`, the carry
out `K` and the running result `R`: `s` in front of the previous step's `R`. A subtraction step
`x-y-k=d bK R` subtracts the column digits and the borrow in, writes the digit `d` (after
borrowing 10 when negative), the borrow out `K` and the running result. The answer is the last
running result with the final carry in front and leading zeros dropped, so it is copied from
the step just before it rather than gathered digit by digit from the whole working (that
reversal was where a model that had every column right still failed). When `a < b` the working
first writes the swap `-(b-a)` and subtracts the larger operand from the smaller, so no step
ever needs a complement pass. Shorter operands are padded with zeros inside the steps
(`7+243=7+3+0=0 c1 0|0+4+1=5 c0 50|0+2+0=2 c0 250|answer: 250`).

Sampling: each operand independently draws its length uniformly from 1..`digits`, then its
value uniformly among the numbers of that length (0..9 for one digit, 10..99 for two,
100..999 for three), and the op uniformly from `ops`. So short and long problems, and every
length pairing, appear equally often.

Splits: a problem is held out when a stable hash (blake2b) of `"a op b"` falls in a fixed
~10% bucket, independent of any seed, so the held-out split never overlaps training.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crosschip.errors import CrosschipError

if TYPE_CHECKING:
    from crosschip.config import DataConfig

OPS = ("+", "-")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10
"""Share of all problems (by stable hash) reserved for the held-out split."""
END_MARKERS = ("\n", "<|eos|>", "<|end|>")
"""Where a generated completion ends for `check`: the first of these (special tokens appear
literally when the text was decoded with `skip_special=False`)."""


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem `a op b` with its prompt and its worked completion."""

    a: int
    op: str
    b: int

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise CrosschipError(f"arith: op must be one of {list(OPS)}, got {self.op!r}")
        for name, value in (("a", self.a), ("b", self.b)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CrosschipError(f"arith: operand {name} must be a non-negative int, got {value!r}")

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def completion(self) -> str:
        """The scratchpad and `answer: N`, without an end-of-sequence token."""
        if self.op == "+":
            working = _add_steps(self.a, self.b)
        elif self.a >= self.b:
            working = _sub_steps(self.a, self.b)
        else:
            # Write the swap first, then subtract the smaller operand from the larger one.
            working = f"-({self.b}-{self.a})|" + _sub_steps(self.b, self.a)
        return f"{working}answer: {self.answer}"

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    """Digit pairs of `a` and `b`, least significant first, the shorter one zero-padded."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    return [(int(x), int(y)) for x, y in zip(reversed(da), reversed(db))]


def _add_steps(a: int, b: int) -> str:
    steps, carry, result = [], 0, ""
    for x, y in _columns(a, b):
        total = x + y + carry
        result = f"{total % 10}{result}"
        steps.append(f"{x}+{y}+{carry}={total % 10} c{total // 10} {result}|")
        carry = total // 10
    return "".join(steps)


def _sub_steps(a: int, b: int) -> str:
    """Column subtraction of `a - b` with `a >= b`."""
    steps, borrow, result = [], 0, ""
    for x, y in _columns(a, b):
        diff = x - y - borrow
        out = 1 if diff < 0 else 0
        result = f"{diff + 10 * out}{result}"
        steps.append(f"{x}-{y}-{borrow}={diff + 10 * out} b{out} {result}|")
        borrow = out
    return "".join(steps)


# --------------------------------------------------------------------------------------------
# Sampling and splits
# --------------------------------------------------------------------------------------------


def split_of(a: int, op: str, b: int) -> str:
    """`"heldout"` or `"train"`, from a stable hash of the problem (Python's hash() is salted)."""
    digest = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "little") % 100 < HELDOUT_PERCENT else "train"


def _check_args(digits: int, ops: Sequence[str], split: str) -> tuple[str, ...]:
    if not isinstance(digits, int) or not 1 <= digits <= 3:
        raise CrosschipError(f"arith: digits must be 1, 2 or 3, got {digits!r}")
    ops = tuple(ops)
    if not ops or any(op not in OPS for op in ops):
        raise CrosschipError(f"arith: ops must be a non-empty subset of {list(OPS)}, got {list(ops)}")
    if split not in SPLITS:
        raise CrosschipError(f"arith: split must be 'train' or 'heldout', got {split!r}")
    # Order and duplicates must not change the stream.
    return tuple(op for op in OPS if op in ops)


def _operand(rng: random.Random, digits: int) -> int:
    length = rng.randint(1, digits)
    low = 0 if length == 1 else 10 ** (length - 1)
    return rng.randint(low, 10**length - 1)


def iter_problems(*, digits: int, ops: Sequence[str], seed: int, split: str = "train") -> Iterator[Problem]:
    """An endless, deterministic stream of problems of one split (repeats are possible)."""
    ops = _check_args(digits, ops, split)
    # A string seed is hashed with sha512 by `random`, so the stream is stable across runs.
    rng = random.Random(f"crosschip-arith:{split}:{seed}")
    while True:
        a, op, b = _operand(rng, digits), rng.choice(ops), _operand(rng, digits)
        if split_of(a, op, b) == split:
            yield Problem(a, op, b)


def _universe(digits: int, ops: Sequence[str], split: str) -> list[Problem]:
    """Every problem of one split, in a fixed order."""
    numbers = range(10**digits)
    return [Problem(a, op, b) for op in ops for a in numbers for b in numbers if split_of(a, op, b) == split]


def generate_problems(n: int, *, digits: int, ops: Sequence[str], seed: int, split: str = "train") -> list[Problem]:
    """`n` problems, deterministic by `seed`.

    Training problems are the first `n` of `iter_problems` (drawn with replacement, so a
    small universe such as 1-digit problems repeats). Held-out problems are distinct: they
    are drawn from the same distribution, skipping repeats; when that stalls (n close to the
    number of held-out problems) the rest is taken from a seeded shuffle of the remaining
    held-out problems. Asking for more held-out problems than exist is a CrosschipError.
    """
    ops = _check_args(digits, ops, split)
    if n < 0:
        raise CrosschipError(f"arith: n must be >= 0, got {n}")
    stream = iter_problems(digits=digits, ops=ops, seed=seed, split=split)
    if split == "train":
        return list(itertools.islice(stream, n))
    check_heldout_count(n, digits, ops)
    chosen: dict[Problem, None] = {}  # an ordered set
    for _ in range(20 * n + 1000):
        if len(chosen) == n:
            return list(chosen)
        chosen[next(stream)] = None
    return _fill_from_universe(chosen, n, digits, ops, seed)


def check_heldout_count(n: int, digits: int, ops: Sequence[str]) -> None:
    """Refuse `n` held-out problems where fewer exist. Counted only past the held-out split's
    expected share; drawing would otherwise take 20 n draws to find out (82 s for 100,000
    2-digit problems, of 2,049)."""
    ops = _check_args(digits, ops, "heldout")
    if n > len(ops) * 10 ** (2 * digits) * HELDOUT_PERCENT // 100:
        _check_heldout_size(n, _universe(digits, ops, "heldout"), digits, ops)


def _check_heldout_size(n: int, universe: list[Problem], digits: int, ops: Sequence[str]) -> None:
    if n > len(universe):
        raise CrosschipError(
            f"arith: asked for {n} held-out problems, but only {len(universe)} distinct held-out problems "
            f"exist for digits={digits} ops={list(ops)}; ask for fewer or raise the digits"
        )


def _fill_from_universe(
    chosen: dict[Problem, None], n: int, digits: int, ops: Sequence[str], seed: int
) -> list[Problem]:
    universe = _universe(digits, ops, "heldout")
    _check_heldout_size(n, universe, digits, ops)
    rest = [p for p in universe if p not in chosen]
    random.Random(f"crosschip-arith:fill:{seed}").shuffle(rest)
    return list(chosen) + rest[: n - len(chosen)]


def heldout_set(cfg: DataConfig) -> list[Problem]:
    """The `cfg.heldout_size` held-out problems used for accuracy and parity."""
    return generate_problems(cfg.heldout_size, digits=cfg.digits, ops=cfg.ops, seed=cfg.seed, split="heldout")


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

# The number must be canonical (no leading zeros, no "-0") and end at the end of the text, a
# newline, a "|" or a literal special token "<|...|>".
_ANSWER = re.compile(r"answer:[ ]*(-?(?:0|[1-9][0-9]*))(?=$|\n|\||<\|)")


def parse_answer(completion: str) -> int | None:
    """The integer after the last `answer:`, or None when it is absent or garbled."""
    at = completion.rfind("answer:")
    if at < 0:
        return None
    match = _ANSWER.match(completion, at)
    if match is None or match.group(1) == "-0":
        return None
    return int(match.group(1))


def check(problem: Problem, completion: str) -> bool:
    """Whether a generated completion ends with the exact answer.

    The completion is cut at its first end marker (newline, `<|eos|>` or `<|end|>`), so
    whatever the model produced after it does not count; within what remains, the number
    after the last `answer:` must equal the true answer and be terminated by the end of the
    text, a newline, `|` or a special token. The working itself is not scored.
    """
    cut = len(completion)
    for marker in END_MARKERS:
        at = completion.find(marker)
        if at >= 0:
            cut = min(cut, at)
    return parse_answer(completion[:cut]) == problem.answer
