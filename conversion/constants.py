"""Facts of the published model that several tools need (SPEC §3)."""

MAX_SEQ_LENGTH = 512  # tokens per text for embedding use; longer texts are truncated
