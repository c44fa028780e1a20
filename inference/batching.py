"""What several tools share: facts of the published model (SPEC §3) and how texts are batched."""

from typing import List, Optional, Sequence, Tuple

import numpy as np

MAX_SEQ_LENGTH = 512  # tokens per text for embedding use; longer texts are truncated
PAD_ID = 1  # XLM-R's <pad>


def length_batches(lengths, batch_size: int, sort: bool = True):
    """Index lists of at most batch_size. sort=True groups similar lengths (longest first), so a
    padded batch wastes little; sort=False keeps arrival order, as a server sees requests."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def token_batches(lengths: List[int], batch_tokens: int) -> List[List[int]]:
    """Indices grouped so each batch holds about batch_tokens real tokens, similar lengths together."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, tokens = [], [], 0
    for i in order:
        # bound the padded size too: the longest text of the batch comes first
        width = lengths[current[0]] if current else lengths[i]
        if current and (tokens + lengths[i] > batch_tokens or (len(current) + 1) * width > 2 * batch_tokens):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        batches.append(current)
    return batches


def pad_batch(token_ids: Sequence[Sequence[int]], idx: List[int], pad_id: int = PAD_ID,
              shape: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [len(idx), longest]: the texts idx of token_ids, right-padded;
    ``shape`` (rows, width) pads to a larger fixed shape instead (a CUDA graph's bucket; extra rows are all padding)."""
    rows, width = shape or (len(idx), max(len(token_ids[i]) for i in idx))
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for row, i in enumerate(idx):
        n = len(token_ids[i])
        ids[row, :n] = token_ids[i]
        mask[row, :n] = 1
    return ids, mask
