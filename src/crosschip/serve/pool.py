"""The latent cache's size, checked before anything is allocated: by the server at its start,
and by `crosschip run` before its first stage (the serve stage comes after minutes of training).
No torch here: the run's own process checks with it."""

from __future__ import annotations

import math
from collections.abc import Callable

from crosschip.errors import CrosschipError, flag


def pool_blocks(
    num_blocks: int,
    block_size: int,
    max_batch: int,
    max_seq_len: int,
    *,
    token_bytes: int,
    device_type: str,
    label: Callable[[str], str] = flag,
) -> int:
    """The pool's block count: `num_blocks`, or for 0 enough blocks for `max_batch` full-length
    sequences (plus scratch). token_bytes: the cache bytes of one token over every layer.

    A pool larger than the host's memory is refused here, before its block tables (a Python
    list of every free block) or its storage exist: the settings, named by `label` (the
    server's flags, or a run config's keys), not a MemoryError traceback or the kernel's OOM
    killer, name the problem. A device's pool is left to its allocator's error."""
    from crosschip.backends.cpu import CPUBackend

    if block_size > max_seq_len:  # every sequence would hold one block mostly empty
        raise CrosschipError(
            f"{label('block_size')} {block_size:,} is larger than the model's context of {max_seq_len:,} tokens; "
            "blocks of 16 tokens (the default) share the cache best"
        )
    blocks = num_blocks if num_blocks > 0 else max_batch * math.ceil(max_seq_len / block_size) + 1
    nbytes = blocks * block_size * token_bytes
    have = CPUBackend().memory_bytes() if device_type == "cpu" else None
    if have is not None and nbytes > 0.9 * have:
        sized_by = (
            label("num_blocks") if num_blocks > 0 else f"{label('max_batch')} {max_batch:,} full-length sequences"
        )
        raise CrosschipError(
            f"the latent cache of {blocks:,} blocks ({sized_by}) of {block_size:,} tokens ({label('block_size')}) "
            f"needs {nbytes / 2**30:,.1f} GiB, more than this machine's {have / 2**30:,.1f} GiB of memory; "
            f"lower {label('num_blocks')}, {label('block_size')} or {label('max_batch')}"
        )
    return blocks
