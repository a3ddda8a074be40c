"""Training data: the verifiable arithmetic task and the user's own text corpora."""

from crosschip.data.arith import (
    Problem,
    check,
    generate_problems,
    heldout_set,
    iter_problems,
    parse_answer,
)
from crosschip.data.corpus import PackedBlocks, builtin_corpus, load_texts, pack_documents

__all__ = [
    "PackedBlocks",
    "Problem",
    "builtin_corpus",
    "check",
    "generate_problems",
    "heldout_set",
    "iter_problems",
    "load_texts",
    "pack_documents",
    "parse_answer",
]
