"""sentence-transformers loads a converted folder and gives the same vectors as our plain encoder."""

import pytest
import torch

from nomic_moe_inference.encoder import Encoder

SHAPE = dict(num_experts=8, top_k=2)
TEXTS = ["What food did they eat?", "", "thunderstorms " * 400, "¡Hola!"]  # empty and over-long included


@pytest.fixture(scope="module")
def both(ckpts):
    from sentence_transformers import SentenceTransformer

    folder = ckpts.converted(**SHAPE)
    return SentenceTransformer(str(folder), trust_remote_code=True, device="cpu"), Encoder(folder)


@pytest.mark.parametrize("prompt", ["query", "document", "passage", "classification", "Clustering"])
def test_same_vectors_as_plain_encoder(both, prompt):
    st, enc = both
    a = torch.as_tensor(st.encode(TEXTS, prompt_name=prompt, convert_to_numpy=True))
    b = enc.encode(TEXTS, prompt=prompt)
    assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


def test_default_prompt_is_document_and_query_helpers(both):
    st, enc = both
    doc = enc.encode(TEXTS, prompt="document")
    assert (torch.as_tensor(st.encode(TEXTS)) - doc).abs().max().item() <= 1e-5
    assert (torch.as_tensor(st.encode_document(TEXTS)) - doc).abs().max().item() <= 1e-5
    query = enc.encode(TEXTS, prompt="query")
    assert (torch.as_tensor(st.encode_query(TEXTS)) - query).abs().max().item() <= 1e-5
    assert (query - doc).abs().max().item() > 1e-3  # the prompts really change the vectors


def test_matryoshka_truncation(ckpts, both):
    from sentence_transformers import SentenceTransformer

    _, enc = both
    st = SentenceTransformer(str(ckpts.converted(**SHAPE)), trust_remote_code=True, device="cpu", truncate_dim=32)
    a = torch.as_tensor(st.encode(TEXTS, prompt_name="query", normalize_embeddings=True))
    b = enc.encode(TEXTS, prompt="query", dim=32)
    assert a.shape == (len(TEXTS), 32) and (a - b).abs().max().item() <= 1e-5


def test_max_seq_length_is_512(both):
    st, _ = both
    assert st.max_seq_length == 512


def test_the_cpu_kernel_installs_on_a_sentence_transformer(ckpts, both, monkeypatch):
    """small_gemm.install(st) finds the model inside a SentenceTransformer: its short queries then take
    the package's kernel (counted), with the same vectors as before and as our encoder's."""
    from sentence_transformers import SentenceTransformer

    from nomic_moe_kernels import small_gemm

    _, enc = both
    st = SentenceTransformer(str(ckpts.converted(**SHAPE)), trust_remote_code=True, device="cpu")
    before = torch.as_tensor(st.encode(TEXTS[:2], prompt_name="query"))
    kernel = small_gemm.install(st)
    if kernel is None:
        assert small_gemm.compiler() is None, small_gemm.why_unavailable()  # a compiler here must build it
        pytest.skip(f"the kernel cannot run here: {small_gemm.why_unavailable()}")
    model = st[0].auto_model
    assert model.cpu_kernel is kernel
    calls = []
    for name in ("linear", "run_layers"):  # counted on the instance: the model calls them through it
        inner = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k))
    after = torch.as_tensor(st.encode(TEXTS[:2], prompt_name="query"))
    assert calls  # the kernel ran (the one call, or its products)
    assert (after - before).abs().max().item() <= 1e-5
    assert (after - enc.encode(TEXTS[:2], prompt="query")).abs().max().item() <= 1e-5
    assert small_gemm.install(torch.nn.Linear(2, 2)) is None  # nothing to give it to
