"""schemathesis against `/openapi.json` of a real pod: requests generated from the document,
valid and invalid (stateless, a bounded number per operation, from a fixed seed). The API must
never answer 5xx, and every error must be OpenAI-shaped: `{"error": {"message", "type", ...}}`.
"""

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from conftest import CHAT, EMBED, Pod

# Examples per operation and generation mode (valid requests, invalid requests).
MAX_EXAMPLES = 60
# The most tokens a generated request may ask for, so a run takes a minute, not an hour.
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def fuzzed_pod():
    # A small context also bounds completions that ask for no `max_tokens` limit.
    p = Pod("--ctx-size", "256")
    yield p
    p.stop()


def bounded(case, mode) -> None:
    """Caps what a generated completion may cost: tokens and choices. Valid requests name a
    model the pod serves (the document cannot say which). Everything else (types, ranges,
    missing and extra fields) stays as generated."""
    body = case.body
    if not isinstance(body, dict):
        return
    if mode == GenerationMode.POSITIVE and case.path.startswith("/v1/"):
        body["model"] = EMBED if case.path == "/v1/embeddings" else CHAT
    if case.path not in ("/v1/chat/completions", "/v1/completions"):
        return
    limits = {"max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS, "n": 2}
    for key, most in limits.items():
        value = body.get(key)
        if type(value) is int and value > most:
            body[key] = most
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS


def check_openai_shaped(case, response) -> None:
    """No server errors; every client error is `{"error": {"message": str, "type": str}}`."""
    what = f"{case.method} {case.path} {json.dumps(case.body, default=str)[:2000]}"
    assert response.status_code < 500, f"{what} -> {response.status_code}: {response.content[:2000]!r}"
    if response.status_code >= 400:
        try:
            body = json.loads(response.content)
        except ValueError:
            pytest.fail(f"{what} -> {response.status_code} with a body that is not JSON: "
                        f"{response.content[:2000]!r}")
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), f"{what} -> {response.status_code}: {body}"
        assert isinstance(error.get("message"), str) and error["message"], f"{what}: {body}"
        assert isinstance(error.get("type"), str) and error["type"], f"{what}: {body}"


def operations(base: str):
    schema = schemathesis.openapi.from_url(base + "/openapi.json", timeout=10)
    for result in schema.get_all_operations():
        yield result.ok()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_never_fails_and_errors_are_openai_shaped(fuzzed_pod, mode):
    tested, untestable = [], []
    statuses: dict[str, list[int]] = {}
    for operation in operations(fuzzed_pod.base):
        tested.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis_seed(20260418)
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def one(case):
            bounded(case, mode)
            response = case.call(timeout=60)
            statuses.setdefault(f"{case.method} {case.path}", []).append(response.status_code)
            check_openai_shaped(case, response)

        try:
            one()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid form to generate.
            assert mode == GenerationMode.NEGATIVE, tested[-1]
            untestable.append(tested[-1])
    # The document lists every route of the API.
    assert "POST /v1/chat/completions" in tested and len(tested) >= 10, tested
    print(mode, {op: sorted(set(codes)) for op, codes in statuses.items()},
          sum(map(len, statuses.values())), "requests")
    # Valid chat requests were served, invalid ones refused.
    chat = statuses.get("POST /v1/chat/completions", [])
    if mode == GenerationMode.POSITIVE:
        assert any(c == 200 for c in chat), chat
    else:
        assert chat and all(400 <= c < 500 for c in chat), chat
