"""The prompts both sides of a parity check run: held-out arithmetic problems and corpus text.

A bundle trained on arithmetic gets both; one trained on a corpus gets corpus text only (its
task has no checker, and arithmetic prompts would say nothing of what it learned).

The parent process builds them once with the bundle's tokenizer and writes them as JSON, so
the reference and the target see exactly the same token ids.

Three uses:
- `scored`: full texts (problem + worked completion, corpus paragraphs) run teacher-forced;
  every position's next-token distribution is compared (KL, top-1, tensor metrics) and the
  corpus ones give the held-out perplexity;
- `greedy`: problem prompts (and corpus prefixes) each side continues greedily; the match
  length and the task accuracy come from them;
- `capture`: the few scored texts the layer bisection records module outputs on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crosschip.data.arith import Problem, generate_problems
from crosschip.data.corpus import builtin_corpus
from crosschip.errors import CrosschipError, flag

TASKS = ("arith", "corpus")
CORPUS_NEW_TOKENS = 32
"""Greedy length of a corpus model's prompts when none is given."""


@dataclass
class Prompt:
    """One token sequence; `problem` is (a, op, b) for arithmetic prompts."""

    kind: str  # "arith" | "corpus"
    ids: list[int]
    problem: tuple[int, str, int] | None = None

    def as_problem(self) -> Problem | None:
        return Problem(*self.problem) if self.problem else None


@dataclass
class PromptSet:
    scored: list[Prompt]
    greedy: list[Prompt]
    max_new_tokens: int
    eos_ids: list[int]
    capture: list[int] = field(default_factory=list)
    """Indices into `scored` the bisection runs on."""
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        to_prompt = lambda d: Prompt(d["kind"], list(d["ids"]), tuple(d["problem"]) if d["problem"] else None)
        return cls(
            scored=[to_prompt(d) for d in data["scored"]],
            greedy=[to_prompt(d) for d in data["greedy"]],
            max_new_tokens=int(data["max_new_tokens"]),
            eos_ids=list(data["eos_ids"]),
            capture=list(data.get("capture", [])),
            meta=dict(data.get("meta", {})),
        )


def build_prompts(
    tokenizer: Any,
    *,
    problems: int,
    scored_problems: int,
    corpus_docs: int,
    digits: int,
    ops: list[str],
    seed: int,
    max_len: int,
    max_new_tokens: int | None = None,
    context: int | None = None,
    capture: int = 4,
    label: Callable[[str], str] = flag,
    task: str = "arith",
    corpus: list[str] | None = None,
) -> PromptSet:
    """Tokenize the held-out problems and corpus paragraphs both sides will run.

    problems: problems continued greedily (task accuracy); the first `scored_problems` of
    them are also scored teacher-forced. corpus_docs: corpus paragraphs, cut to `max_len`
    tokens, scored teacher-forced (perplexity) and continued greedily from a 16-token prefix.
    max_new_tokens: greedy length; None = the longest worked completion plus 2, so a model
    that has learned the task can finish every problem (`CORPUS_NEW_TOKENS` when there are
    none). context: the model's, which no greedy prompt plus max_new_tokens may pass. task:
    what the model was trained on; `corpus` leaves the problems out. corpus: the texts of the
    corpus paragraphs (None: the built-in corpus). Errors name the settings by `label`:
    `crosschip verify`'s flags, or a run config's keys.
    """
    if task not in TASKS:
        raise CrosschipError(f"unknown task {task!r}; verify scores {' or '.join(TASKS)}")
    if corpus_docs < 0:
        raise CrosschipError(f"{label('corpus_docs')} must be >= 0, got {corpus_docs}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise CrosschipError(f"{label('max_new_tokens')} must be >= 1, got {max_new_tokens}")
    chosen = _problems(problems, digits, ops, seed, label) if task == "arith" else []
    bos = [tokenizer.bos_id]
    scored, greedy = [], []
    for i, p in enumerate(chosen):
        key = (p.a, p.op, p.b)
        greedy.append(Prompt("arith", bos + tokenizer.encode(p.prompt), key))
        if i < scored_problems:
            scored.append(Prompt("arith", (bos + tokenizer.encode(p.text) + [tokenizer.eos_id])[:max_len], key))
    texts = builtin_corpus() if corpus is None else corpus
    for text in texts[:corpus_docs]:
        ids = (bos + tokenizer.encode(text))[:max_len]
        scored.append(Prompt("corpus", ids))
        greedy.append(Prompt("corpus", ids[:16]))
    if not chosen and not any(len(p.ids) > 1 for p in scored):
        # A corpus model is judged on its text alone (and its int8 gate on the perplexity).
        raise CrosschipError(
            f"the bundle was trained on a corpus, so verify scores corpus text, and "
            f"{label('corpus_docs')} {corpus_docs} over {len(texts)} documents gives none to score; "
            f"give {label('corpus_docs')} 1 or more"
        )
    if max_new_tokens is None:
        needed = [len(tokenizer.encode(p.completion)) + 2 for p in chosen]
        max_new_tokens = max(needed) if needed else CORPUS_NEW_TOKENS
        if context is not None and not needed:  # a default never exceeds the context
            max_new_tokens = max(1, min(max_new_tokens, context - max(len(p.ids) for p in greedy)))
    # Checked before either side starts: a reference on torch generated past the context the
    # bundle serves (and --max-new-tokens 100000 ran for minutes), then the target refused.
    longest = max(len(p.ids) for p in greedy)
    if context is not None and longest + max_new_tokens > context:
        raise CrosschipError(
            f"greedy prompts of up to {longest} tokens plus {max_new_tokens:,} new tokens exceed the "
            f"model's context of {context} tokens; give {label('max_new_tokens')} {context - longest} or less"
        )
    # Capture a few of each kind: a fault may only show on one of them.
    arith_idx = [i for i, p in enumerate(scored) if p.kind == "arith"][: capture // 2]
    corpus_idx = [i for i, p in enumerate(scored) if p.kind == "corpus"][: capture - len(arith_idx)]
    meta = {"task": task, "seed": seed, "problems": len(chosen), "corpus_docs": corpus_docs}
    if chosen:
        meta |= {"digits": digits, "ops": list(ops)}
    eos_ids = [tokenizer.eos_id] + ([tokenizer.end_id] if getattr(tokenizer, "end_id", None) is not None else [])
    return PromptSet(scored, greedy, max_new_tokens, eos_ids, arith_idx + corpus_idx, meta)


def _problems(problems: int, digits: int, ops: list[str], seed: int, label: Callable[[str], str]) -> list[Problem]:
    if problems < 1:
        raise CrosschipError(f"{label('problems')} must be >= 1, got {problems}")
    if not 1 <= digits <= 3:
        raise CrosschipError(f"{label('digits')} must be 1, 2 or 3, got {digits}")
    try:
        return generate_problems(problems, digits=digits, ops=ops, seed=seed, split="heldout")
    except CrosschipError as e:
        raise CrosschipError(f"{label('problems')}: {e}") from None
