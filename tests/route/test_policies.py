"""Every routing policy, filter and scorer as a pure function of a request and plain backend state; the outlier
state machine, the budgets and the stream bookkeeping that failover continues from. No network."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from aiinfra.route.fleet import BackendConfig, GatewayConfig, OutlierConfig
from aiinfra.route.policies import (
    Policy,
    RouteRequest,
    bounded_load,
    cheapest_within_slo,
    latency_scores,
    least_outstanding,
    pick_weighted,
    predicted_latency_s,
    prefer_region,
    prefix_scores,
    queue_scores,
    rendezvous,
)
from aiinfra.route.requests import prefix_blocks
from aiinfra.route.state import BackendState, Budget, LatencyWindow, Outlier, PrefixIndex
from aiinfra.route.stream import SSEParser, StreamState, is_error_event, strip_token_ids_raw


def backend(name: str, outstanding: int = 0, region: str = "", cost_in: float = 0.0, cost_out: float = 0.0,
            ttft_s: float | None = None, tpot_s: float | None = None, kv: float | None = None,
            max_concurrency: int | None = None) -> BackendState:
    config = BackendConfig(name=name, url="http://127.0.0.1:1", model="m", region=region, cost_per_mtok_in=cost_in,
                           cost_per_mtok_out=cost_out, max_concurrency=max_concurrency)
    state = BackendState(config, PrefixIndex(1000))
    state.outstanding, state.ttft_s, state.tpot_s, state.kv_cache_usage = outstanding, ttft_s, tpot_s, kv
    return state


def policy(**gateway: object) -> Policy:
    return Policy(GatewayConfig(**gateway), seed=0)


REQUEST = RouteRequest(model="m", max_tokens=100)


def test_round_robin_visits_every_backend_in_turn() -> None:
    backends = [backend("a"), backend("b"), backend("c")]
    chooser = policy(policy="round_robin")
    picks = [chooser.pick(REQUEST, backends).name for _ in range(9)]
    assert Counter(picks) == {"a": 3, "b": 3, "c": 3}
    assert picks[:3] != picks[0:1] * 3


def test_least_outstanding_takes_the_less_loaded_of_two_and_never_the_busiest() -> None:
    backends = [backend("idle", 0), backend("busy", 10), backend("mid", 5)]
    rng = random.Random(0)
    picks = Counter(least_outstanding(backends, rng).name for _ in range(300))
    assert "busy" not in picks and picks["idle"] > picks["mid"]
    assert least_outstanding([backends[1]], rng).name == "busy"


def test_queue_scores_are_normalised_and_count_engine_waiting() -> None:
    a, b = backend("a", 2), backend("b", 2)
    b.waiting = 4
    assert queue_scores(REQUEST, [a, b]) == [1.0, 0.0]
    assert queue_scores(REQUEST, [backend("x", 3), backend("y", 3)]) == [1.0, 1.0]


def test_latency_policy_prefers_the_fastest_times_its_load_and_explores_the_unmeasured() -> None:
    fast = backend("fast", outstanding=1, ttft_s=0.05, tpot_s=0.01)
    slow = backend("slow", outstanding=1, ttft_s=0.2, tpot_s=0.05)
    assert predicted_latency_s(REQUEST, fast) == pytest.approx(1.05)
    assert latency_scores(REQUEST, [fast, slow]) == [1.0, 0.0]
    loaded_fast = backend("fast", outstanding=9, ttft_s=0.05, tpot_s=0.01)  # 1.05 s x 10 > 5.2 s x 2
    assert policy(policy="latency").pick(REQUEST, [loaded_fast, slow]).name == "slow"
    assert policy(policy="latency").pick(REQUEST, [slow, backend("new")]).name == "new"


def test_cost_policy_takes_the_cheapest_backend_that_meets_the_slo() -> None:
    cheap_slow = backend("cheap", cost_out=0.1, ttft_s=1.0, tpot_s=0.05)  # predicts 6 s
    mid = backend("mid", cost_out=1.0, ttft_s=0.1, tpot_s=0.01)  # 1.1 s
    dear_fast = backend("dear", cost_out=5.0, ttft_s=0.05, tpot_s=0.005)  # 0.55 s
    assert cheapest_within_slo(REQUEST, [cheap_slow, mid, dear_fast], slo_s=2.0).name == "mid"
    assert cheapest_within_slo(REQUEST, [cheap_slow, mid, dear_fast], slo_s=10.0).name == "cheap"
    assert cheapest_within_slo(REQUEST, [cheap_slow, mid, dear_fast], slo_s=0.1).name == "dear"  # none meets it
    assert policy(policy="cost", latency_slo_ms=2000).pick(REQUEST, [cheap_slow, mid, dear_fast]).name == "mid"


def test_session_affinity_is_stable_and_moves_only_the_sessions_of_a_removed_backend() -> None:
    backends = [backend(name) for name in "abcd"]
    sessions = [f"user-{i}" for i in range(400)]
    before = {s: rendezvous(s, backends).name for s in sessions}
    assert before == {s: rendezvous(s, list(reversed(backends))).name for s in sessions}
    assert len(set(before.values())) == 4
    after = {s: rendezvous(s, [b for b in backends if b.name != "c"]).name for s in sessions}
    assert all(after[s] == before[s] for s in sessions if before[s] != "c")
    chooser = policy(policy="session")
    assert chooser.pick(RouteRequest(model="m", session="user-7"), backends).name == before["user-7"]


def test_prefix_scores_count_leading_blocks_only() -> None:
    text = "system: you are a helpful assistant. " * 20
    blocks = prefix_blocks(text, 64)
    assert len(blocks) == len(text) // 64
    assert prefix_blocks(text + "more", 64)[: len(blocks)] == blocks  # chained: a prefix has the same hashes
    assert prefix_blocks("x" + text, 64)[0] != blocks[0]
    seen, unseen = backend("seen"), backend("unseen")
    seen.prefix.add(blocks[:5])
    request = RouteRequest(model="m", prefix_blocks=blocks)
    assert prefix_scores(request, [seen, unseen]) == [5 / len(blocks), 0.0]
    seen.prefix.blocks.pop(blocks[0])  # without the first block nothing after it matches
    assert prefix_scores(request, [seen])[0] == 0.0


def test_prefix_index_is_a_bounded_lru() -> None:
    index = PrefixIndex(capacity=3)
    index.add((1, 2, 3))
    index.add((1,))  # touched: now the most recent
    index.add((4,))
    assert list(index.blocks) == [3, 1, 4]


def test_prefix_policy_follows_the_prefix_but_no_backend_exceeds_the_load_cap() -> None:
    blocks = prefix_blocks("shared system prompt " * 40, 128)
    request = RouteRequest(model="m", prefix_blocks=blocks)
    warm, cold = backend("warm", outstanding=2), backend("cold", outstanding=2)
    warm.prefix.add(blocks)
    chooser = policy(policy="prefix", load_cap_eps=0.25)
    assert chooser.pick(request, [warm, cold]).name == "warm"
    warm.outstanding = 5  # 6 > ceil(1.25 x (7 + 1) / 2) = 5: over the cap, whatever its prefix
    assert chooser.pick(request, [warm, cold]).name == "cold"
    assert [b.name for b in bounded_load([warm, cold], 0.25)] == ["cold"]
    assert [b.name for b in bounded_load([backend("x", 0), backend("y", 0)], 0.0)] == ["x", "y"]


def test_weighted_picker_sums_scores_and_custom_weights_replace_the_policy() -> None:
    a, b = backend("a", outstanding=0, kv=0.9), backend("b", outstanding=3, kv=0.0)
    rng = random.Random(0)
    assert pick_weighted(REQUEST, [a, b], {"queue": 1.0}, rng).name == "a"
    assert pick_weighted(REQUEST, [a, b], {"kv": 1.0}, rng).name == "b"
    assert pick_weighted(REQUEST, [a, b], {"queue": 1.0, "kv": 2.0}, rng).name == "b"
    assert policy(policy="least_outstanding", weights={"kv": 1.0}).pick(REQUEST, [a, b]).name == "b"


def test_region_preference_spills_over_only_when_the_region_has_no_backend_left() -> None:
    eu, us = backend("eu", region="eu"), backend("us", region="us")
    assert prefer_region([eu, us], "eu") == [eu]
    assert prefer_region([us], "eu") == [us]
    assert prefer_region([eu, us], "") == [eu, us]
    chooser = policy(policy="least_outstanding", region="us")
    assert {chooser.pick(REQUEST, [eu, us]).name for _ in range(20)} == {"us"}
    assert chooser.pick(RouteRequest(model="m", region="eu"), [eu, us]).name == "eu"  # the header overrides


def test_a_backend_is_available_only_up_unejected_uncooled_and_under_its_cap() -> None:
    state = backend("a", outstanding=1, max_concurrency=2)
    assert state.available(now=100.0)
    state.outstanding = 2
    assert not state.available(now=100.0)
    state.outstanding, state.cooldown_until = 0, 101.0
    assert not state.available(now=100.0) and state.available(now=101.5)
    state.up = False
    assert not state.available(now=200.0)


def test_outlier_ejection_grows_with_each_ejection_and_respects_the_pool_share() -> None:
    config = OutlierConfig(consecutive_failures=3, base_ejection_s=10, max_ejection_s=25)
    outlier = Outlier()
    assert not outlier.record_failure(0.0, config, may_eject=True)
    outlier.record_success()  # a success resets the run of failures
    assert [outlier.record_failure(0.0, config, True) for _ in range(3)] == [False, False, True]
    assert outlier.ejected(9.9) and not outlier.ejected(10.0)
    assert [outlier.record_failure(20.0, config, True) for _ in range(3)][-1]
    assert outlier.ejected(39.9) and not outlier.ejected(40.0)  # the second ejection lasts 2 x 10 s
    for _ in range(3):
        outlier.record_failure(50.0, config, True)
    assert outlier.ejected_until == 75.0  # 3 x 10 s capped at 25 s
    capped = Outlier()
    assert not any(capped.record_failure(0.0, config, may_eject=False) for _ in range(10))


def test_budgets_and_the_hedging_quantile() -> None:
    budget = Budget(ratio=0.1, burst=2)
    assert budget.try_spend() and budget.try_spend() and not budget.try_spend()
    for _ in range(10):
        budget.on_request()
    assert budget.try_spend() and not budget.try_spend()  # 10 requests earn one extra attempt
    assert not Budget(ratio=0.0).try_spend()
    window = LatencyWindow(size=100)
    for value in range(19):
        window.add(value / 100)
    assert window.quantile(0.95) is None  # too few samples to know what is slow
    for value in range(19, 100):
        window.add(value / 100)
    assert window.quantile(0.95) == pytest.approx(0.95)


def test_sse_parser_reassembles_events_split_anywhere() -> None:
    stream = b'data: {"a": 1}\n\ndata: {"b": 2}\r\n\r\n: comment\n\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        parser = SSEParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert [data for _, data in events] == ['{"a": 1}', '{"b": 2}', "[DONE]"]
        # Events pass on as they came, CRLF framing as LF; a comment carries no data and is not an event.
        assert b"".join(raw for raw, _ in events) == stream.replace(b"\r\n", b"\n").replace(b": comment\n\n", b"")


def test_stream_state_builds_exact_and_text_continuations() -> None:
    chat = StreamState(chat=True)
    chunks = [{"id": "c1", "created": 5, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "token_ids": []}]},
              {"id": "c1", "created": 5, "choices": [{"index": 0, "delta": {"content": "Hel"}, "token_ids": [7, 8]}]},
              {"id": "c1", "created": 5, "choices": [{"index": 0, "delta": {"content": "lo"}, "token_ids": [9]}]}]
    for chunk in chunks:
        chat.observe(chunk)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
    exact = chat.continuation(body, exact=True)
    assert exact["continuation"] == {"output_token_ids": [7, 8, 9], "emitted_chars": 5}
    text = chat.continuation(body, exact=False)
    assert text["messages"][-1] == {"role": "assistant", "content": "Hello"} and text["max_tokens"] == 8
    assert text["continue_final_message"] is True
    role_again = {"id": "other", "created": 9, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert chat.rewrite(role_again) is None
    more = chat.rewrite({"id": "other", "created": 9, "choices": [{"index": 0, "delta": {"content": "!"}}]})
    assert (more["id"], more["created"]) == ("c1", 5)
    completion = StreamState(chat=False)
    completion.observe({"id": "x", "choices": [{"index": 0, "text": "ab", "finish_reason": None}]})
    assert completion.continuation({"prompt": "p", "max_tokens": 4}, exact=False)["prompt"] == "pab"
    assert completion.continuation({"prompt": [1, 2], "max_tokens": 4}, exact=False) is None
    assert completion.continuation({"prompt": "p", "n": 2}, exact=True) is None
    completion.observe({"id": "x", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
    assert completion.continuation({"prompt": "p"}, exact=True) is None  # finished: nothing to continue


def test_token_ids_are_cut_from_raw_events_and_a_summary_is_parsed_only_on_demand() -> None:
    raw = b'data: {"id": "c", "choices": [{"index": 0, "text": "a]b", "logprobs": null, "finish_reason": null, ' \
          b'"token_ids": [1, 2, 3]}]}\n\n'
    assert strip_token_ids_raw(raw) == raw.replace(b', "token_ids": [1, 2, 3]', b"")
    first = b'data: {"choices": [{"token_ids": [], "index": 0, "text": "x"}]}\n\n'
    assert strip_token_ids_raw(first) == b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
    assert strip_token_ids_raw(b'data: {"choices": []}\n\n') == b'data: {"choices": []}\n\n'
    assert is_error_event('{"error": {"message": "engine died"}}') and not is_error_event(raw[6:-2].decode())
    state = StreamState(chat=False, sent=[raw[6:-2].decode(), '{"id": "c", "choices": [{"index": 0, "text": "!", '
                                          '"token_ids": [4], "finish_reason": null}]}'])
    state.summarise()
    assert (state.id, state.text, state.token_ids, state.finish_reason) == ("c", "a]b!", [1, 2, 3, 4], None)
