"""A fuzz run of the HTTP API with hypothesis: bodies built from every field the server knows (and some it does
not), each set to arbitrary JSON, over a valid base request. No response may be a 5xx other than 503 (overload),
and no stream may carry an internal error."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiinfra.serve.protocol import UNSUPPORTED_SAMPLING_FIELDS, ChatRequest, CompletionRequest

from .server import running_server, tiny_served_model

FIELDS = sorted(set(CompletionRequest.model_fields) | set(ChatRequest.model_fields) | set(UNSUPPORTED_SAMPLING_FIELDS)
                | {"user", "priority", "stream_options", "tool_choice"})
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 400)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(["0", "5", "type", "text"]),
                                             inner, max_size=4), max_leaves=12)
# Values near the valid ones find more than arbitrary JSON does.
PLAUSIBLE = {
    "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 400), max_size=6)
    | st.lists(st.lists(st.integers(0, 299), max_size=4), max_size=4),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool",
                                                                        "wizard"]),
                                                "content": st.text(max_size=10) | st.lists(st.fixed_dictionaries(
                                                    {"type": st.sampled_from(["text", "image_url"]),
                                                     "text": SCALARS}), max_size=2)}), max_size=3),
    "logprobs": st.integers(-1, 25) | st.booleans(), "top_logprobs": st.integers(-1, 25),
    "logit_bias": st.dictionaries(st.text(max_size=4) | st.integers(-5, 400).map(str), SCALARS, max_size=3),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5),
    "continuation": st.fixed_dictionaries({"output_token_ids": st.lists(st.integers(-2, 400), max_size=5),
                                           "emitted_chars": st.integers(-2, 50)}),
    "max_tokens": st.integers(-1, 80), "n": st.integers(-1, 5), "seed": st.integers(-(2**64), 2**64),
    "temperature": st.floats(-0.5, 2.5), "top_p": st.floats(-0.1, 1.1), "top_k": st.integers(-2, 400),
    "presence_penalty": st.floats(-2.5, 2.5), "frequency_penalty": st.floats(-2.5, 2.5),
    "repetition_penalty": st.floats(0, 3) | st.just(1e-300), "min_tokens": st.integers(-1, 90),
    "stop_token_ids": st.lists(st.integers(-1, 400), max_size=3), "stream_options": st.fixed_dictionaries(
        {"include_usage": st.booleans()}),
    **{flag: st.booleans() for flag in ("stream", "echo", "ignore_eos", "return_token_ids")},
}
ARBITRARY = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5).flatmap(
    lambda body: st.fixed_dictionaries({name: (PLAUSIBLE[name] | st.just(value)) if name in PLAUSIBLE
                                        else st.just(value) for name, value in body.items()})
)
NEAR_VALID = st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=4, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: PLAUSIBLE[name] for name in names}))
BODIES = st.one_of(NEAR_VALID, ARBITRARY)


@pytest.fixture(scope="module")
def server():
    with running_server(tiny_served_model(max_seq_len=96)) as running:
        yield running


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_requests_never_get_a_5xx_other_than_503(server, path) -> None:
    base = {"prompt": "def f", "max_tokens": 4} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    failures: list[str] = []
    statuses: list[int] = []
    with httpx.Client(base_url=server.base_url, timeout=60) as http:

        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(body=BODIES, drop_base=st.integers(0, 4).map(lambda draw: draw == 0))
        def check(body: dict, drop_base: bool) -> None:
            payload = body if drop_base else base | body
            response = http.post(path, content=json.dumps(payload), headers={"content-type": "application/json"})
            statuses.append(response.status_code)
            if response.status_code >= 500 and response.status_code != 503:
                failures.append(f"{response.status_code} {payload!r}: {response.text[:200]}")
            elif '"internal_error"' in response.text:
                failures.append(f"internal error in a stream for {payload!r}")

        check()
    assert not failures, failures[:5]
    assert statuses.count(200) > 12  # the run reached the model, not only the validation
