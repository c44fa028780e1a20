"""The HTTP face: OpenAI's /v1/embeddings, TEI's /embed, /v1/models, /info, /health, /metrics.

Every client error on the OpenAI routes has OpenAI's shape {"error": {message, type, param, code}}
and names the field; /embed answers in TEI's shape {"error", "error_type"}. No client error is a
5xx (the openai client retries those), overload is 429 with Retry-After, not ready or draining
503, a passed deadline 504.
"""

import base64
import os
import time
from typing import List, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from .batcher import Dropped, Overloaded
from .engine import Engine

OPENAI_ROUTES = ("/v1/embeddings", "/embeddings", "/v1/models")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIError(BaseModel):
    error: ErrorBody


class TEIError(BaseModel):
    error: str
    error_type: str


Input = Union[str, List[str], List[int], List[List[int]]]


class EmbeddingsRequest(BaseModel):
    input: Input = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    model: str = Field(description="the served model name (GET /v1/models)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, description="Matryoshka: keep the first N dims and normalise again (768 and 256 were trained)")
    user: Optional[str] = None
    prompt_name: Optional[str] = Field(None, description="task prompt: query, document, passage, classification, clustering")
    input_type: Optional[str] = Field(None, description="alias of prompt_name")
    truncate: bool = Field(True, description="cut texts longer than 512 tokens (default); false: 413")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[List[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: List[EmbeddingData]
    model: str
    usage: Usage


class EmbedRequest(BaseModel):
    inputs: Input
    normalize: bool = True
    truncate: bool = True
    truncation_direction: Literal["right", "Right"] = "right"
    prompt_name: Optional[str] = None
    dimensions: Optional[int] = None


def _errors(*codes, tei=False):
    model = TEIError if tei else OpenAIError
    return {c: {"model": model, "description": d} for c, d in {
        400: "bad request: malformed JSON, a wrong type, an empty or unknown value (names the field)",
        401: "missing or wrong API key", 404: "unknown model", 413: "body, input count or text too large",
        422: "validation error (TEI's code)", 429: "overloaded: retry after Retry-After seconds",
        503: "loading or draining", 504: "the request's deadline passed before it ran"}.items() if c in codes}


METERED = ("/v1/embeddings", "/embeddings", "/embed", "/v1/models", "/info", "/health")


class Guard:
    """Admission before any route runs (body size, API key) and each route's count and time, as a
    plain ASGI middleware: Starlette's @app.middleware("http") added 0.3-0.37 ms to every request
    (RESULTS.md), a query's overhead on top of the model."""

    def __init__(self, app, settings, metrics, error_response):
        self.app, self.s, self.m, self.error_response = app, settings, metrics, error_response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, route, status = time.perf_counter(), scope["path"], [500]  # 500: no response started (a bug)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self.admission(scope)
            if error is None:
                await self.app(scope, receive, send_status)
            else:
                await self.error_response(Request(scope), error)(scope, receive, send_status)
        finally:
            if route in METERED:
                self.m.requests.labels(route, str(status[0])).inc()
                self.m.request_seconds.labels(route).observe(time.perf_counter() - t0)

    def admission(self, scope) -> Optional["APIError"]:
        if scope["method"] != "POST":
            return None
        headers = dict(scope["headers"])
        size = headers.get(b"content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > self.s.max_body_bytes:
            return APIError(413, f"the body has {size} bytes; the limit is {self.s.max_body_bytes}", None, "body_too_large")
        if self.s.api_key is not None and headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.s.api_key}":
            return APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key",
                            kind="authentication_error")
        return None


def create_app(engine: Engine) -> FastAPI:
    s = engine.settings
    app = FastAPI(title="nomic-moe serve", version="1", description="Nomic Embed v2 MoE embeddings: OpenAI and TEI routes")
    app.state.engine = engine
    m = engine.metrics

    def is_openai(request: Request) -> bool:
        return request.url.path in OPENAI_ROUTES

    def error_response(request: Request, e: APIError) -> JSONResponse:
        if request.url.path == "/embed":
            e.status = 422 if e.status == 400 else e.status  # TEI's validation code
            kind = {413: "Validation", 422: "Validation", 400: "Validation", 429: "Overloaded", 503: "Unhealthy", 504: "Backend"}
            body = {"error": e.message, "error_type": kind.get(e.status, "Validation")}
        else:
            body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return error_response(request, e)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            msg, param = f"the body is not valid JSON ({err.get('msg', '')}); send a JSON object", None
        else:
            field = ".".join(p for p in loc if not p.isdigit() and "[" not in p and p not in ("str", "int")) or "body"
            param = field.split(".")[0] if field != "body" else None
            msg = f"{field}: {err.get('msg', 'invalid value')}"
            if param == "input" or param == "inputs":
                msg += "; send a string, a list of strings, or lists of token ids"
        status = 422 if request.url.path == "/embed" else 400
        return error_response(request, APIError(status, msg, param, "invalid_value"))

    app.add_middleware(Guard, settings=s, metrics=m, error_response=error_response)

    def ready_or_raise():
        if engine.state != "ready":
            why = {"loading": "the model is loading; retry shortly", "draining": "the server is shutting down",
                   "failed": f"the model failed to load: {engine.error}"}.get(engine.state, engine.state)
            raise APIError(503, why, None, engine.state, kind="server_error", headers={"Retry-After": "1"})

    async def run(request: Request, inputs, prompt_name, truncate: bool, param: str):
        """-> (raw pooled [n, H], prompt tokens, applied prompt, already-prefixed count, truncated count)."""
        ready_or_raise()
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            raise APIError(400, f"{param} is empty; send at least one text", param, "empty_input")
        if isinstance(inputs[0], int):  # one token-id list
            inputs = [inputs]
        if len(inputs) > s.max_inputs:
            raise APIError(413, f"{param} has {len(inputs)} items; at most {s.max_inputs} per request", param, "too_many_inputs")
        try:
            prompt = engine.prompts.resolve(prompt_name)
        except KeyError:
            raise APIError(400, f"unknown prompt {prompt_name!r}; use one of {', '.join(engine.prompts.names)}",
                           "prompt_name", "unknown_prompt") from None
        applied, prefixed = None, 0
        if isinstance(inputs[0], str):
            empty = [i for i, t in enumerate(inputs) if not isinstance(t, str) or not t.strip()]
            if empty:
                raise APIError(400, f"{param}[{empty[0]}] is an empty string; every text needs content", param, "empty_input")
            choice = engine.prompts.apply(inputs, prompt)
            applied, prefixed = choice.name, choice.already_prefixed
            ids, lengths = await engine.tokenize(choice.texts)
        else:
            ids = [list(x) for x in inputs]
            bad = next((i for i, x in enumerate(ids) if not x), None)
            if bad is not None:
                raise APIError(400, f"{param}[{bad}] is an empty token list", param, "empty_input")
            vocab = engine.backend.vocab_size
            bad = next((i for i, x in enumerate(ids) if min(x) < 0 or max(x) >= vocab), None)
            if bad is not None:
                raise APIError(400, f"{param}[{bad}] holds token ids outside 0..{vocab - 1}", param, "invalid_token_id")
            lengths = [len(x) for x in ids]
            ids = [x if len(x) <= 512 else x[:512] for x in ids]
        long = [i for i, n in enumerate(lengths) if n > 512]
        if long and not truncate:
            raise APIError(413, f"{param}[{long[0]}] has {lengths[long[0]]} tokens; the model takes 512 "
                           "(send truncate: true to cut it)", param, "input_too_long")
        tokens = sum(len(x) for x in ids)
        if tokens > s.max_tokens_per_request:
            raise APIError(413, f"{param} has {tokens} tokens; at most {s.max_tokens_per_request} per request", param, "too_many_tokens")
        timeout = s.request_timeout
        header = request.headers.get("x-request-timeout")
        if header:
            try:
                timeout = min(timeout, max(0.0, float(header)))
            except ValueError:
                raise APIError(400, "x-request-timeout must be a number of seconds", None, "invalid_header") from None
        try:
            job = await engine.embed(ids, engine.lane_for(ids, prompt or applied), time.monotonic() + timeout, request.is_disconnected)
        except Overloaded as e:
            m.rejected.labels("overloaded").inc()
            raise APIError(429, f"the server is at capacity ({e}); retry after {e.retry_after:.0f} s", None, "overloaded",
                           kind="rate_limit_error", headers={"Retry-After": str(int(np.ceil(e.retry_after)))}) from None
        except Dropped as e:
            m.dropped.labels(e.why).inc()
            if e.why == "shutdown":
                raise APIError(503, "the server is shutting down", None, "draining", kind="server_error") from None
            raise APIError(504, f"the request waited past its deadline ({timeout:g} s)", None, "timeout", kind="timeout_error") from None
        headers = {"x-prompt-applied": applied or "none", "x-prompt-already-prefixed": str(prefixed),
                   "x-queue-time": f"{1000 * (job.first_batch - job.enqueued):.1f}", "x-inference-time": f"{1000 * job.infer_seconds:.1f}",
                   "x-compute-tokens": str(tokens), "x-truncated-inputs": str(len(long))}
        return job.vectors, tokens, headers

    def finish(vectors: np.ndarray, dimensions: Optional[int], normalize: bool) -> np.ndarray:
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(np.float32)

    def check_dimensions(dimensions: Optional[int], status: int = 400):
        if dimensions is not None and not 1 <= dimensions <= engine.hidden_size:
            raise APIError(status, f"dimensions {dimensions} is outside 1..{engine.hidden_size} (768 and 256 were trained)",
                           "dimensions", "invalid_value")

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=_errors(400, 401, 404, 413, 429, 503, 504))
    @app.post("/embeddings", response_model=EmbeddingsResponse, responses=_errors(400, 401, 404, 413, 429, 503, 504),
              include_in_schema=False)
    async def embeddings(body: EmbeddingsRequest, request: Request):
        """OpenAI's embeddings contract, plus prompt_name / input_type for the task prompt."""
        if body.model != engine.name:
            raise APIError(404, f"the model {body.model!r} is not served here; this server serves {engine.name!r}",
                           "model", "model_not_found")
        check_dimensions(body.dimensions)
        if body.prompt_name and body.input_type and body.prompt_name != body.input_type:
            raise APIError(400, "prompt_name and input_type disagree; send one of them", "input_type", "invalid_value")
        vectors, tokens, headers = await run(request, body.input, body.prompt_name or body.input_type, body.truncate, "input")
        vectors = finish(vectors, body.dimensions, True)
        if body.encoding_format == "base64":
            data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                    for i, v in enumerate(vectors)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": engine.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers=headers)

    @app.post("/embed", response_model=List[List[float]], responses=_errors(401, 413, 422, 429, 503, 504, tei=True))
    async def embed(body: EmbedRequest, request: Request):
        """TEI's embed contract: LangChain's and LlamaIndex's TEI clients work unchanged."""
        check_dimensions(body.dimensions, 422)
        vectors, tokens, headers = await run(request, body.inputs, body.prompt_name, body.truncate, "inputs")
        return JSONResponse(finish(vectors, body.dimensions, body.normalize).tolist(), headers=headers)

    @app.get("/v1/models", responses=_errors(401))
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "nomic-moe"}]}

    @app.get("/info")
    async def info():
        b = engine.backend.backends() if engine.backend else {}
        return {"model_id": engine.name, "model_dir": str(engine.model_dir), "revision": engine.revision, "state": engine.state,
                "dtype": engine.dtype if not s.onnx else f"onnx:{s.onnx}", "device": s.provider if s.onnx else s.device,
                "backend": engine.backend.kind if engine.backend else None, "attention": b.get("attention"), "experts": b.get("experts"),
                "short_batches": b.get("short batches"),
                "max_input_length": 512, "dimensions": engine.hidden_size, "prompts": engine.prompts.prompts,
                "default_prompt": engine.prompts.default,
                "max_batch_tokens": engine.batcher.max_batch_tokens if engine.batcher else None,
                "max_query_batch_tokens": engine.batcher.query_batch_tokens if engine.batcher else None,
                "max_queue_tokens": engine.batcher.max_queue_tokens if engine.batcher else None,
                "warmup_tokens_per_second": engine.rate, "max_client_batch_size": s.max_inputs,
                "query_lane_tokens": s.query_tokens,
                "batching": ("queries between steps of bulk batches" if engine.preempt else "queries first at batch boundaries")
                if engine.batcher else None,
                "bulk_share": s.bulk_share if engine.batcher and engine.preempt else None, "model_nice": engine.nice,
                "pid": os.getpid()}

    @app.get("/health", responses={503: {"description": "loading, draining or failed"}})
    async def health():
        if engine.state == "ready":
            return {"status": "ok"}
        return JSONResponse({"status": engine.state, "error": engine.error}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    return app
