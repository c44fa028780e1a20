"""Where a model comes from: a local folder, or a Hub repo id resolved through huggingface_hub (its cache works offline)."""

from pathlib import Path

from .errors import UserError


def resolve_source(src: str) -> Path:
    """A local folder, or a Hub repo id resolved through huggingface_hub (its cache works offline)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{src} is a file, not a checkpoint folder", "pass the folder holding config.json")
        return path
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise UserError(f"{src} does not exist", "pass a checkpoint folder or a Hub repo id such as nomic-ai/nomic-embed-text-v2-moe")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.bin", "*.pt"]
            )
        )
    except Exception as e:  # offline without a cached copy, unknown repo, no access
        raise UserError(
            f"cannot get {src} from the Hugging Face Hub or its local cache: {type(e).__name__}: {e}",
            "download it once online (huggingface-cli download REPO), or pass a local folder",
        ) from None
