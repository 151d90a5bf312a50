"""The cascade's pure parts: the confidence score, the decision, reading logprobs out of answers, the SSE replay of
a small answer, and FLEET.toml's [[cascade]] validation."""

from __future__ import annotations

import math

import orjson
import pytest

from aiinfra.config import ConfigError
from aiinfra.route.cascade import answer_logprobs, confidence, decide, prompt_logprobs, quantile, score_runs
from aiinfra.route.cascaded import replay_stream, scoring_body, small_body, strip_logprobs
from aiinfra.route.fleet import parse_fleet


def test_quantile_interpolates_as_numpy() -> None:
    values = [0.4, 0.1, 0.3, 0.2]
    assert quantile(values, 0.0) == 0.1
    assert quantile(values, 1.0) == 0.4
    assert quantile(values, 0.5) == pytest.approx(0.25)
    assert quantile(values, 1 / 3) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_confidence_quantile_ignores_length_and_sees_one_wild_guess() -> None:
    confident = [math.log(0.9)] * 4
    assert confidence(confident, "quantile", 0.0) == pytest.approx(0.9)
    # Ten times as long at the same per-token probability: the quantile does not fall (a summed logprob would).
    assert confidence(confident * 10, "quantile", 0.1) == pytest.approx(0.9)
    one_guess = [math.log(0.9)] * 9 + [math.log(0.01)]
    assert confidence(one_guess, "quantile", 0.0) == pytest.approx(0.01)
    # The geometric mean hides most of the guess: exp(mean logprob).
    assert confidence(one_guess, "mean") == pytest.approx(math.exp((9 * math.log(0.9) + math.log(0.01)) / 10))
    assert confidence([], "quantile") == 0.0  # nothing vouches for an empty answer: it escalates
    assert confidence([float("nan"), math.log(0.5)], "quantile", 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        confidence(confident, "median")


def test_decide_is_a_threshold_on_the_score() -> None:
    assert decide(0.5, 0.5) == "small"  # at the threshold the small answer stands
    assert decide(0.49, 0.5) == "large"
    assert decide(1.0, 1.0) == "small"
    assert decide(0.0, 0.0) == "small"
    assert decide(None, 0.0) == "large"
    assert decide(float("nan"), 0.0) == "large"


def test_answer_logprobs_reads_both_formats() -> None:
    completion = {"choices": [{"index": 1, "text": "b", "logprobs": {"token_logprobs": [-0.5]}},
                              {"index": 0, "text": "a", "logprobs": {"token_logprobs": [-0.1, -0.2]}}]}
    assert answer_logprobs(completion, chat=False) == [[-0.1, -0.2], [-0.5]]
    chat = {"choices": [{"index": 0, "message": {"content": "x"},
                         "logprobs": {"content": [{"token": "x", "logprob": -0.3}]}}]}
    assert answer_logprobs(chat, chat=True) == [[-0.3]]
    echoed = {"choices": [{"index": 0, "logprobs": {"token_logprobs": [None, -1.0, -0.2, -0.4]}}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 2}}
    assert answer_logprobs(echoed, chat=False, echo=True) == [[-0.2, -0.4]]  # the prompt's entries are not scored
    with pytest.raises(ValueError, match="no logprobs"):
        answer_logprobs({"choices": [{"index": 0, "text": "a", "logprobs": None}]}, chat=False)
    with pytest.raises(ValueError, match="no choices"):
        answer_logprobs({"choices": []}, chat=False)


def test_prompt_logprobs_drops_the_unpredicted_first_token_and_the_generated_one() -> None:
    echoed = {"choices": [{"index": 0, "text": "def f(): x",
                           "logprobs": {"token_logprobs": [None, -1.0, -2.0, -0.5]}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    assert prompt_logprobs(echoed) == [[-1.0, -2.0]]
    two_prompts = {"choices": [{"index": 0, "logprobs": {"token_logprobs": [None, -1.0, -9.0]}},
                               {"index": 1, "logprobs": {"token_logprobs": [None, -3.0, -9.0]}}],
                   "usage": {"completion_tokens": 2}}
    assert prompt_logprobs(two_prompts) == [[-1.0], [-3.0]]
    # One weak prompt (or choice) is enough to escalate the request.
    assert score_runs(prompt_logprobs(two_prompts), "quantile", 0.0) == pytest.approx(math.exp(-3.0))


def test_request_bodies_of_each_mode() -> None:
    body = {"model": "auto", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    assert small_body(body, chat=False) == {"model": "auto", "prompt": "x", "logprobs": 0}
    assert small_body(body | {"logprobs": 3}, chat=False)["logprobs"] == 3  # the client's own request stands
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert small_body(chat, chat=True) == chat | {"logprobs": True, "top_logprobs": 0}
    assert scoring_body(body, chat=False) == {"prompt": "x", "echo": True, "logprobs": 0, "max_tokens": 1,
                                              "temperature": 0.0}
    messages = {"messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert scoring_body(messages, chat=True)["prompt"] == "be brief\nhi"


def _events(body: bytes) -> list:
    datas = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    return [orjson.loads(data) for data in datas[:-1]]


def test_replay_stream_gives_a_chunk_per_token_with_or_without_logprobs() -> None:
    payload = {"id": "cmpl-1", "created": 7, "model": "small", "usage": {"completion_tokens": 2},
               "choices": [{"index": 0, "text": "ab cd", "finish_reason": "length",
                            "logprobs": {"tokens": ["ab", " cd"], "token_logprobs": [-0.1, -0.2],
                                         "top_logprobs": [None, None], "text_offset": [0, 2]}}]}
    events = _events(replay_stream(payload, chat=False, logprobs=False, usage=False))
    assert [e["choices"][0]["text"] for e in events] == ["ab", " cd", ""]
    assert all(e["choices"][0]["logprobs"] is None for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length" and all(e["id"] == "cmpl-1" for e in events)
    with_logprobs = _events(replay_stream(payload, chat=False, logprobs=True, usage=True))
    assert with_logprobs[1]["choices"][0]["logprobs"]["token_logprobs"] == [-0.2]
    assert with_logprobs[-1]["usage"] == {"completion_tokens": 2} and with_logprobs[-1]["choices"] == []
    # Tokens that do not spell the text (a multi-byte character split): one chunk of the whole text.
    odd = {"choices": [{"index": 0, "text": "é", "finish_reason": "stop",
                        "logprobs": {"tokens": ["\\xc3", "\\xa9"], "token_logprobs": [-1.0, -1.0]}}]}
    assert [e["choices"][0]["text"] for e in _events(replay_stream(odd, False, False, False))] == ["é", ""]


def test_replay_stream_of_a_chat_answer() -> None:
    payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"},
                            "finish_reason": "stop",
                            "logprobs": {"content": [{"token": "hi", "logprob": -0.1},
                                                     {"token": " there", "logprob": -0.2}]}}]}
    events = _events(replay_stream(payload, chat=True, logprobs=True, usage=False))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "hi there"
    assert events[2]["choices"][0]["logprobs"] == {"content": [{"token": " there", "logprob": -0.2}]}
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert strip_logprobs(payload)["choices"][0]["logprobs"] is None


def _fleet(**cascade: object) -> dict:
    return {"backend": [{"name": "e", "url": "http://127.0.0.1:1", "model": "edge"},
                        {"name": "c", "url": "http://127.0.0.1:2", "model": "cloud"}],
            "cascade": [{"model": "auto", "small": "edge", "large": "cloud", "threshold": 0.3} | cascade]}


def test_fleet_accepts_a_cascade_with_its_defaults() -> None:
    fleet = parse_fleet(_fleet())
    cascade = fleet.cascade[0]
    assert (cascade.mode, cascade.statistic, cascade.quantile, cascade.threshold) == ("generate", "quantile", 0.1, 0.3)
    assert parse_fleet(_fleet(mode="prompt", statistic="mean")).cascade[0].mode == "prompt"


@pytest.mark.parametrize(("change", "message"), [
    ({"small": "edgy"}, "cascade[0] (auto).small: 'edgy' is not the model of any [[backend]]; expected one of cloud, "
                        "edge"),
    ({"large": "nope"}, "cascade[0] (auto).large: 'nope' is not the model of any [[backend]]"),
    ({"threshold": 1.5}, "cascade[0] (auto).threshold: Input should be less than or equal to 1"),
    ({"threshold": -0.1}, "cascade[0] (auto).threshold: Input should be greater than or equal to 0"),
    ({"threshold": None}, "cascade[0] (auto).threshold: Input should be a valid number"),
    ({"quantile": 2}, "cascade[0] (auto).quantile: Input should be less than or equal to 1"),
    ({"mode": "guess"}, "cascade[0] (auto).mode: Input should be 'generate' or 'prompt'"),
    ({"model": "edge"}, "cascade[0] (edge).model: 'edge' is already the model of a [[backend]]"),
    ({"large": "edge"}, "cascade[0] (auto): small and large are both 'edge'; expected two pools"),
    ({"tresholds": 0.2}, "cascade[0] (auto).tresholds: unknown key"),
])
def test_fleet_rejects_a_bad_cascade_naming_the_key(change: dict, message: str) -> None:
    tree = _fleet(**change)
    if change.get("threshold", 0) is None:
        del tree["cascade"][0]["threshold"]
        message = "cascade[0] (auto).threshold: Field required"
    with pytest.raises(ConfigError) as error:
        parse_fleet(tree, "FLEET.toml")
    assert str(error.value).startswith(f"FLEET.toml: {message}")


def test_fleet_rejects_two_cascades_of_one_name() -> None:
    tree = _fleet()
    tree["cascade"].append(dict(tree["cascade"][0]))
    with pytest.raises(ConfigError, match=r"cascade\[1\] \(auto\).model: 'auto' names two cascades"):
        parse_fleet(tree)
