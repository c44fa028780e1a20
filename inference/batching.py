"""What several tools share: facts of the published model (SPEC §3) and how texts are batched."""

MAX_SEQ_LENGTH = 512  # tokens per text for embedding use; longer texts are truncated


def length_batches(lengths, batch_size: int, sort: bool = True):
    """Index lists of at most batch_size. sort=True groups similar lengths (longest first), so a
    padded batch wastes little; sort=False keeps arrival order, as a server sees requests."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
