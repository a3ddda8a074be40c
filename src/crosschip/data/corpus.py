"""The user's own text corpus: loading `.txt`/`.jsonl` files and packing token blocks.

Documents:
- a `.txt` file is ONE document (its whole text), so a user controls document boundaries by
  using one file per document, or a `.jsonl` file with one document per line;
- a `.jsonl` file holds one JSON object per line with a string `"text"` field; blank lines are
  skipped;
- a folder is searched recursively for both extensions, in sorted path order;
- documents that are empty or only whitespace are dropped.

The shipped corpus (`builtin_corpus`) is `assets/corpus.txt` split on blank lines: every
paragraph is a document.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from crosschip.errors import CrosschipError

if TYPE_CHECKING:
    import torch

EXTENSIONS = (".txt", ".jsonl")


def _files_of(path: Path) -> list[Path]:
    if not path.exists():
        raise CrosschipError(f"corpus: path not found: {path}")
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if path.suffix.lower() not in EXTENSIONS:
        raise CrosschipError(
            f"corpus: unsupported file type {path.suffix or '(none)'!r} for {path}; use .txt or .jsonl"
        )
    return [path]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CrosschipError(f"corpus: {path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for no, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CrosschipError(f"corpus: {path}:{no}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CrosschipError(f'corpus: {path}:{no}: expected an object with a string "text" field')
        texts.append(record["text"])
    return texts


def load_texts(paths: Sequence[str | Path], limit: int | None = None) -> list[str]:
    """The documents of `.txt`/`.jsonl` files and folders of them, in the order given; with
    `limit`, the first that many (files past them are not read: verify and the serving smoke
    take a few documents of a corpus that may be large)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[str] = []
    full = lambda: limit is not None and len(docs) >= limit
    for path in map(Path, paths):
        if full():
            break
        for file in _files_of(path):
            if full():
                break
            texts = _read_jsonl(file) if file.suffix.lower() == ".jsonl" else [_read_text(file)]
            docs.extend(t for t in texts if t.strip())
    if not docs:
        shown = ", ".join(str(p) for p in paths) or "(no paths)"
        raise CrosschipError(f"corpus: no non-empty documents found in {shown}")
    return docs[:limit]


def builtin_corpus() -> list[str]:
    """The shipped technical-prose corpus, one document per paragraph."""
    text = resources.files("crosschip").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    return [" ".join(p.split("\n")).strip() for p in text.split("\n\n") if p.strip()]


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


@dataclass
class PackedBlocks:
    """Fixed-length blocks of packed documents; every tensor is (N, seq_len) int64."""

    input_ids: torch.Tensor
    doc_ids: torch.Tensor
    """Index (into the packed `docs`) of the document each token belongs to; -1 for padding.
    Attention must stay within equal ids."""
    positions: torch.Tensor
    """Position of each token within its document piece (0 at each piece start), so RoPE
    restarts per document; 0 for padding."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def labels(self, ignore_index: int = -100) -> torch.Tensor:
        """Next-token targets that never cross a document boundary or point at padding."""
        import torch

        labels = torch.full_like(self.input_ids, ignore_index)
        same = (self.doc_ids[:, 1:] == self.doc_ids[:, :-1]) & (self.doc_ids[:, 1:] >= 0)
        labels[:, :-1] = torch.where(same, self.input_ids[:, 1:], ignore_index)
        return labels


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, *, pad_id: int) -> PackedBlocks:
    """Pack token lists into (N, seq_len) blocks, in order.

    A document longer than `seq_len` is cut into `seq_len`-long pieces (the last one shorter).
    Pieces are placed next-fit: a piece goes into the current block when it fits, otherwise
    the current block is padded with `pad_id` and a new block starts. Documents are never
    split only to fill a block, so every piece shorter than `seq_len` is a whole document or
    a document's tail. Empty documents are skipped.
    """
    if seq_len < 1:
        raise CrosschipError(f"pack_documents: seq_len must be >= 1, got {seq_len}")
    blocks: list[tuple[list[int], list[int], list[int]]] = []
    used = seq_len  # forces a new block for the first piece
    for doc_id, doc in enumerate(docs):
        doc = list(doc)
        for start in range(0, len(doc), seq_len):
            piece = doc[start : start + seq_len]
            if used + len(piece) > seq_len:
                blocks.append(([], [], []))
                used = 0
            ids, owners, positions = blocks[-1]
            ids.extend(piece)
            owners.extend([doc_id] * len(piece))
            positions.extend(range(len(piece)))
            used += len(piece)
    return _to_tensors(blocks, seq_len, pad_id)


def _to_tensors(blocks: list[tuple[list[int], list[int], list[int]]], seq_len: int, pad_id: int) -> PackedBlocks:
    import torch  # imported here so that loading text never pulls in torch

    n = len(blocks)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.int64)
    doc_ids = torch.full((n, seq_len), -1, dtype=torch.int64)
    positions = torch.zeros((n, seq_len), dtype=torch.int64)
    for row, (ids, owners, pos) in enumerate(blocks):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        doc_ids[row, : len(ids)] = torch.tensor(owners, dtype=torch.int64)
        positions[row, : len(ids)] = torch.tensor(pos, dtype=torch.int64)
    return PackedBlocks(input_ids, doc_ids, positions)
