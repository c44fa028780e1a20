"""Opt-in: the published checkpoint's known values (SPEC §4).

Set NOMIC_MOE_REAL_CHECKPOINT to a folder holding nomic-ai/nomic-embed-text-v2-moe (config.json,
model.safetensors, tokenizer files). Without it these tests are skipped, saying why.
"""

import os
from pathlib import Path

import pytest
import torch

REAL = os.environ.get("NOMIC_MOE_REAL_CHECKPOINT")
pytestmark = pytest.mark.skipif(not REAL, reason="NOMIC_MOE_REAL_CHECKPOINT is not set: no real checkpoint at hand")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from nomic_moe_conversion.convert import convert

    return convert(REAL, str(tmp_path_factory.mktemp("real") / "converted"))


def test_tokenizer_ids(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted), trust_remote_code=True)
    ids = tok("search_query: What food did they eat?")["input_ids"]
    assert ids == [0, 33938, 454, 944, 1294, 12, 4865, 15381, 6777, 1836, 73203, 32, 2]


def test_hidden_state_values(converted):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(converted), trust_remote_code=True, dtype=torch.float32).eval()
    batch = tok(["search_query: What food did they eat?", "search_query: thunderstorms"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    expect = {
        (0, 0, slice(0, 3)): [0.6144, 0.5655, 0.0732],
        (0, 0, slice(-3, None)): [-0.1502, -0.3853, 0.5019],
        (0, 1, slice(0, 3)): [0.8870, 0.3930, -0.5521],
        (1, 0, slice(0, 3)): [0.4435, 0.0964, 0.3501],
    }
    for idx, values in expect.items():
        assert torch.allclose(h[idx], torch.tensor(values), atol=1.5e-4), (idx, h[idx])


def test_model_card_cosine(converted):
    from nomic_moe_inference.encoder import Encoder

    emb = Encoder(Path(converted)).encode(["Hello!", "¡Hola!"], prompt="passage")
    assert abs(float(emb[0] @ emb[1]) - 0.9118) < 5e-4
