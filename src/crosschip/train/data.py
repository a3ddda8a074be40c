"""The training batch stream: packed fixed-length rows with per-document masks, and a cursor.

Every step draws one *global* batch of `batch_size` rows of `seq_len` tokens. All processes
build the same global batch and each keeps its own rows, so a run's data does not depend on
the number of processes, and the cursor (a few integers) is all a checkpoint needs to resume
the stream exactly.

Arithmetic rows hold whole problems `<bos> prompt completion <eos>` packed next-fit; a
problem never straddles two rows. `doc_ids` keeps attention inside a problem and
`positions` restart at 0 per problem, so a packed row trains exactly like separate padded
rows without the padding. With `mask_prompt`, loss is only taken on the completion and its
EOS: the operands are uniformly random, so predicting them teaches nothing.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from crosschip.config import DataConfig
from crosschip.data.arith import Problem, iter_problems
from crosschip.data.corpus import load_texts, pack_documents
from crosschip.errors import CrosschipError
from crosschip.tokenizer import Tokenizer
from crosschip.train.launch import check_batch_split

IGNORE = -100
"""Label of positions that carry no loss (cross_entropy's ignore_index)."""


@dataclass
class Batch:
    """One batch of packed rows; every tensor is (B, T) int64."""

    input_ids: Tensor
    labels: Tensor
    """Next-token target of each position, IGNORE where no loss is taken."""
    positions: Tensor
    doc_ids: Tensor
    """Document of each token, -1 for padding."""

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def label_positions(self) -> Tensor:
        """Flat (B * T) indices of the positions that carry a label."""
        return (self.labels.flatten() != IGNORE).nonzero().squeeze(1)

    def rows(self, index: slice | Tensor) -> Batch:
        return Batch(self.input_ids[index], self.labels[index], self.positions[index], self.doc_ids[index])

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(t.to(device, non_blocking=True) for t in (self.input_ids, self.labels, self.positions, self.doc_ids))
        )


class ArithStream:
    """Packed batches of the arithmetic task; the cursor counts problems and batches drawn."""

    def __init__(self, data: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int):
        self.data, self.tok = data, tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.mask_prompt = data.mask_prompt
        self.problems = 0
        self.batches = 0
        self._restart()
        # Checked on the first problems now, not at the first step: a run refused then has
        # already written its log and a step-0 checkpoint.
        self._peek()
        self._check_fits(max(len(tokens) for tokens, _ in self._ahead))

    def _check_fits(self, n: int) -> None:
        if n > self.seq_len:
            raise CrosschipError(
                f"train.seq_len {self.seq_len} is shorter than one problem ({n} tokens); raise train.seq_len"
            )

    def _restart(self) -> None:
        self._it: Iterator[Problem] = iter_problems(digits=self.data.digits, ops=self.data.ops, seed=self.data.seed)
        self._ahead: deque[tuple[list[int], int]] = deque()
        for _ in range(self.problems):
            next(self._it)

    def _peek(self) -> tuple[list[int], int]:
        """The next problem as (tokens, prompt length including BOS), not yet consumed."""
        if not self._ahead:
            chunk = [next(self._it) for _ in range(256)]
            prompts = self.tok.encode_batch([p.prompt for p in chunk], add_bos=True)
            completions = self.tok.encode_batch([p.completion for p in chunk])
            for p, c in zip(prompts, completions):
                self._ahead.append((p + c + [self.tok.eos_id], len(p)))
        return self._ahead[0]

    def _take(self) -> None:
        self._ahead.popleft()
        self.problems += 1

    def draw(self) -> Batch:
        """The next global batch (B, T)."""
        B, T = self.batch_size, self.seq_len
        # Rows are built as Python lists and become tensors once per batch: a few tensor ops per
        # problem cost ~30 us each. On an H200 the stream took 41 ms of small-100m's ~165 ms step.
        ids, labels, positions, doc_ids = [], [], [], []
        for _ in range(B):
            r_ids: list[int] = []
            r_labels: list[int] = []
            r_pos: list[int] = []
            r_doc: list[int] = []
            doc = 0
            while True:
                tokens, n_prompt = self._peek()
                n = len(tokens)
                self._check_fits(n)
                if len(r_ids) + n > T:
                    break
                self._take()
                # label at i is token i+1; the first label-carrying position is the last prompt token.
                first = n_prompt - 1 if self.mask_prompt else 0
                r_labels += [IGNORE] * first + tokens[first + 1 :] + [IGNORE]
                r_ids += tokens
                r_pos += range(n)
                r_doc += [doc] * n
                doc += 1
            pad = T - len(r_ids)
            ids.append(r_ids + [self.tok.pad_id] * pad)
            labels.append(r_labels + [IGNORE] * pad)
            positions.append(r_pos + [0] * pad)
            doc_ids.append(r_doc + [-1] * pad)
        self.batches += 1
        return Batch(*(torch.tensor(x, dtype=torch.int64) for x in (ids, labels, positions, doc_ids)))

    def state_dict(self) -> dict[str, int]:
        return {"problems": self.problems, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.problems, self.batches = int(state["problems"]), int(state["batches"])
        self._restart()


class CorpusStream:
    """Packed batches of the user's text; rows are reshuffled every epoch from the seed."""

    def __init__(self, data: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int):
        if seq_len < 2:  # a row's labels are its own next tokens: one token predicts nothing
            raise CrosschipError(
                f'train.seq_len {seq_len} is too short for data.task = "corpus": it must be at least 2'
            )
        docs = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(load_texts(data.corpus))]
        self.blocks = pack_documents(docs, seq_len, pad_id=tokenizer.pad_id)
        self.labels = self.blocks.labels(IGNORE)
        if int((self.labels != IGNORE).sum()) == 0:
            raise CrosschipError("data.corpus: the corpus has no token to predict (every document is empty)")
        self.seed, self.batch_size = data.seed, batch_size
        self.rows_drawn = 0
        self.batches = 0
        self._epoch, self._epoch_order = -1, []

    def _order(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            self._epoch_order = list(range(len(self.blocks)))
            random.Random(f"crosschip-corpus:{self.seed}:{epoch}").shuffle(self._epoch_order)
            self._epoch = epoch
        return self._epoch_order

    def draw(self) -> Batch:
        n = len(self.blocks)
        index = []
        for k in range(self.rows_drawn, self.rows_drawn + self.batch_size):
            index.append(self._order(k // n)[k % n])
        self.rows_drawn += self.batch_size
        self.batches += 1
        rows = torch.tensor(index)
        b = self.blocks
        return Batch(b.input_ids[rows], self.labels[rows], b.positions[rows], b.doc_ids[rows])

    def state_dict(self) -> dict[str, int]:
        return {"rows": self.rows_drawn, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.rows_drawn, self.batches = int(state["rows"]), int(state["batches"])


class BatchStream:
    """Global batches in a fixed order, minus the batches the health guard chose to skip.

    With `prefetch`, a background thread draws the next batch while the current step runs, as
    a DataLoader worker would: on an accelerator, the host builds batches (tokenizing and
    packing problems, ~35 ms for 16 x 1024 tokens) while the device computes, and the step
    waits for neither. Most of a step's host time is spent in the autograd engine and in
    kernels' Python bindings, which release the GIL. The cursor in `state_dict` is always that
    of the last batch handed out, so a checkpoint resumes at the same batch either way.
    """

    def __init__(
        self, data: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int, *, prefetch: bool = False
    ):
        cls = ArithStream if data.task == "arith" else CorpusStream
        self.task = data.task
        self.source = cls(data, tokenizer, batch_size, seq_len)
        self.skip: set[int] = set()
        """Indices of global batches never to train on again (they caused a rollback)."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="crosschip-data") if prefetch else None
        self._ahead: Future | None = None
        self._cursor = self.source.state_dict()

    def _draw(self) -> tuple[int, Batch, dict]:
        """(index, batch, the source's cursor after it) of the next batch that is not skipped."""
        while True:
            index = self.source.batches
            batch = self.source.draw()
            if index not in self.skip:
                return index, batch, self.source.state_dict()

    def next(self) -> tuple[int, Batch]:
        """(index, batch) of the next global batch that is not skipped."""
        if self._pool is None:
            index, batch, self._cursor = self._draw()
            return index, batch
        if self._ahead is None:
            self._ahead = self._pool.submit(self._draw)
        # Kept in `_ahead` until it is done: a step interrupted here (the watchdog's StepHang)
        # leaves it for `_drop_ahead`, which waits before the source is touched again.
        index, batch, self._cursor = self._ahead.result()
        self._ahead = self._pool.submit(self._draw)
        return index, batch

    def _drop_ahead(self) -> None:
        """Forget the batch drawn ahead, or its error, once its draw is over."""
        if self._ahead is not None:
            self._ahead.exception()  # waits: the thread is the only other user of the source
            self._ahead = None

    def state_dict(self) -> dict:
        return {**self._cursor, "skip": sorted(self.skip)}

    def load_state_dict(self, state: dict) -> None:
        # Each task's cursor has keys of its own: another task's is a changed config, not a
        # damaged checkpoint.
        if not self.source.state_dict().keys() <= state.keys():
            raise CrosschipError(
                f"the checkpoint's data position is not one of a data.task = {self.task!r} run: a resume continues "
                "the run's own data, so keep its data.task, or start a new run in another --out"
            )
        self._drop_ahead()
        self.source.load_state_dict(state)
        self._cursor = self.source.state_dict()
        self.skip |= set(state.get("skip", []))

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown()


def shard_rows(batch: Batch, rank: int, world: int, grad_accum: int) -> list[Batch]:
    """This process's micro-batches: rows rank::world of the global batch, in grad_accum chunks."""
    check_batch_split(batch.input_ids.shape[0], world, grad_accum)
    mine = batch.rows(slice(rank, None, world))
    per = mine.input_ids.shape[0] // grad_accum
    return [mine.rows(slice(i * per, (i + 1) * per)) for i in range(grad_accum)]
