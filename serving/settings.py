"""What `nomic-moe serve` was told, in one place (the CLI, the Ray deployment and the tests build one)."""

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class Settings:
    model: str  # a folder or a Hub repo id
    host: str = "127.0.0.1"  # never all interfaces unless told
    port: int = 8080
    served_model_name: Optional[str] = None  # default: the folder's name or the repo id
    dtype: str = "float32"  # float32 | bfloat16 | float16 | int8 | auto
    device: str = "cpu"
    onnx: Optional[str] = None  # a file in MODEL/onnx/: ONNX Runtime instead of PyTorch
    provider: str = "cpu"
    threads: Optional[int] = None
    model_nice: int = 5  # a CPU model's threads this much nicer than the rest of the server (Linux; 0: as the process)
    cuda_graphs: bool = True  # on CUDA, short batches replay captured graphs (nomic_moe_inference.cuda_graphs)
    max_batch_tokens: Optional[int] = None  # default: sized at warm-up so one batch takes batch_seconds
    batch_seconds: Optional[float] = None  # default: 4 s where queries preempt bulk between steps of half a layer (PyTorch), else 1 s
    bulk_share: float = 0.75  # share of model time bulk work keeps while queries come back to back
    query_batch_tokens: Optional[int] = None  # most tokens in a query batch; default: the backend's short-batch size, 0: none
    max_queue_tokens: Optional[int] = None  # default: 32 batches
    query_tokens: int = 256  # a request of at most this many tokens (or a query-prompt request that fits one batch) is interactive
    max_inputs: int = 2048  # per request, as OpenAI
    max_body_bytes: int = 8 << 20
    max_tokens_per_request: int = 300_000  # OpenAI's limit
    request_timeout: float = 120.0  # seconds a request may wait in all; a header may ask for less
    api_key: Optional[str] = None
    engine: str = "local"  # local | ray
    replicas: Optional[int] = None
    cpus_per_replica: Optional[int] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["api_key"] = "set" if self.api_key else None
        return d
