"""A fuzzer against the server's own /openapi.json: no 5xx, and no status code the schema does not document."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import status_code_conformance  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from serve_fixtures import API_KEY, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory):
    s = ServerProcess(ckpts.converted(), "--api-key", API_KEY, "--served-model-name", "tiny",
                      log=tmp_path_factory.mktemp("fuzz") / "server.log")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.terminate()


def test_fuzz_no_server_errors(server):
    # schemathesis's pytest plugin does not load under this pytest; its strategies under plain hypothesis do
    from hypothesis import given

    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embeddings", "/embed", "/v1/models", "/health", "/info"}
    seen = set()
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            for headers in ({"Authorization": f"Bearer {API_KEY}"}, {}):
                r = case.call_and_validate(headers=headers, checks=[not_a_server_error, status_code_conformance], timeout=60)
                seen.add((op.path, r.status_code))

        run()
    assert any(code == 200 for _, code in seen) and any(400 <= code < 500 for _, code in seen)
