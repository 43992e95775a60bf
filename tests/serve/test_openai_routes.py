"""The OpenAI-compatible routes: the official ``openai`` client against one real Serve app (labeler
auth on, a full version v0001 and a LoRA adapter version v0002 on it), and without Serve the pure
mapping functions and what generation learned for them (a seeded request, token counts)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests
import torch
from support.serve import publish_tiny, publish_tiny_adapter, serve_config, start_with_admin

from rlhf.serve.openai_messages import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationParams,
    Usage,
)
from rlhf.serve.openai_routes import (
    chat_chunks,
    cut_at_stop,
    finish,
    param_name,
    sampling_of,
    sse_events,
    usage_of,
    word_chunks,
)
from rlhf.serve.policy_versions import PolicyVersions
from rlhf.serve.records import Sampling, Summary, SummaryRequest

ADMIN_TOKEN = "openai-admin-token-0123456789abcdefghij"
TEXT = "The city council voted on Tuesday to extend the bike lane network across the river."
OTHER = "Prices rose for the third month in a row, the statistics office said on Friday."
PER_LABELER = 40  # requests per minute: the 429 test's labeler uses them up; alice never does
MAX_NEW_TOKENS = 24  # serve_config's serve.max_new_tokens


def _summary(text: str, completion_tokens: int = 5, at_limit: bool = False) -> Summary:
    return Summary(text, "v0001", False, 10, completion_tokens, at_limit)


def test_stop_strings_cut_before_the_first_one_and_decide_the_finish_reason():
    assert cut_at_stop("one. two, three", [",", ". "]) == ("one", True)
    assert cut_at_stop("one two", ["x"]) == ("one two", False)
    assert finish(_summary("one. two", at_limit=True), ["."]) == ("one", "stop")
    assert finish(_summary("one two", at_limit=True), ["."]) == ("one two", "length")
    assert finish(_summary("one two"), []) == ("one two", "stop")


@pytest.mark.parametrize("text", ["", "one", " two  words ", "a\n\nb\tc  ", "   "])
def test_stream_pieces_are_words_that_join_back_to_the_text(text: str):
    pieces = word_chunks(text)
    assert "".join(pieces) == text
    assert all(len(piece.split()) == 1 for piece in pieces[:-1] if pieces)


def test_sampling_usage_and_parameter_names_map_openai_onto_generation():
    params = GenerationParams(model="current", temperature=0.7, seed=5)
    assert [sampling_of(params, i) for i in (0, 1)] == [Sampling(0.7, None, 5), Sampling(0.7, None, 6)]
    assert sampling_of(GenerationParams(model="current", temperature=0), 3) is None  # greedy
    assert sampling_of(GenerationParams(model="current"), 0) == Sampling(None, None, None)
    usage = usage_of([[_summary("a", 3), _summary("b", 4)], [_summary("c", 5)]])
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (20, 12, 32)
    assert param_name(("body", "messages", 0, "content")) == "messages[0].content"
    assert param_name(("body",)) is None


def test_request_bodies_take_the_document_from_the_last_user_message_or_the_prompt():
    chat = ChatCompletionRequest.model_validate({"model": "v0001", "max_tokens": 9, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]},
    ]})
    assert (chat.document(), chat.length(), chat.stops()) == ("one two", 9, [])
    single = CompletionRequest.model_validate({"model": "v0001", "prompt": "a", "stop": "x"})
    assert (single.prompt, single.stops()) == (["a"], ["x"])


def test_a_chat_completion_streams_as_events_the_openai_types_accept():
    completion = ChatCompletion(
        id="chatcmpl-1", created=1, model="v0001",
        usage=Usage(prompt_tokens=3, completion_tokens=9, total_tokens=12),
        choices=[ChatChoice(index=0, message=AssistantMessage(content="two words"), finish_reason="length")],
    )
    events = list(sse_events(chat_chunks(completion, include_usage=True)))
    assert events[-1] == "data: [DONE]\n\n"
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    chunks = [openai.types.chat.ChatCompletionChunk.model_validate_json(e[6:]) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "two words"
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 12


def test_generation_honours_a_seed_alone_or_batched_and_counts_tokens(tmp_path: Path):
    """PolicyVersions without Serve: a seeded request writes the same text whatever it is batched
    with, leaves torch's generator as it found it, and every summary carries its token counts."""
    publish_tiny(tmp_path / "registry", seed=1)
    cfg = serve_config(tmp_path / "registry", tmp_path / "feedback.db")
    versions = PolicyVersions(cfg.registry, cfg.policy, cfg.serve, torch.device("cpu"))
    seeded = SummaryRequest(TEXT, "v0001", True, 12, Sampling(temperature=1.0, seed=7))
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    alone = versions.generate([seeded])[0]
    assert torch.rand(1) == expected_draw
    batched = versions.generate([SummaryRequest(OTHER, "v0001", True, 12), seeded,
                                 SummaryRequest(TEXT, "v0001", False, 12)])
    assert isinstance(alone, Summary) and batched[1] == alone
    other_seed = versions.generate([SummaryRequest(TEXT, "v0001", True, 12, Sampling(1.0, None, 8))])[0]
    assert isinstance(other_seed, Summary) and other_seed.text != alone.text
    # Tiny versions never write eos (publish_tiny): every summary runs to its cap, one byte a token.
    assert (alone.completion_tokens, alone.at_length_limit, len(alone.text.encode())) == (12, True, 12)
    long = versions.generate([SummaryRequest(TEXT * 10, "v0001", False, 4)])[0]
    assert isinstance(long, Summary) and long.truncated and long.prompt_tokens == cfg.policy.max_source_length
    assert 0 < alone.prompt_tokens < long.prompt_tokens


@dataclass
class App:
    url: str
    token: str  # alice's labeler token: the API key

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        """The official client; no retries, so a 429 or 5xx shows at once."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or self.token, max_retries=0,
                             timeout=120)

    def labeler(self, name: str) -> str:
        answer = requests.post(self.url + "/admin/labelers", json={"name": name}, timeout=60,
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert answer.status_code == 200, answer.text
        return answer.json()["token"]


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    from ray import serve

    root = tmp_path_factory.mktemp("openai")
    registry = root / "registry"
    publish_tiny_adapter(registry, publish_tiny(registry, seed=1), seed=2)
    cfg = serve_config(registry, root / "feedback.db", "serve.labeler_auth=true",
                       f"serve.requests_per_minute_per_labeler={PER_LABELER}")
    served = App(start_with_admin(cfg, ADMIN_TOKEN), "")
    served.token = served.labeler("alice")
    yield served
    serve.shutdown()


def _chat(client: openai.OpenAI, text: str = TEXT, **kwargs) -> openai.types.chat.ChatCompletion:
    kwargs = {"model": "current", "temperature": 0, "max_tokens": 8, **kwargs}
    return client.chat.completions.create(messages=[{"role": "user", "content": text}], **kwargs)


def test_models_lists_current_and_every_version(app: App):
    client = app.client(api_key="no token needed")  # public, like /v1/policy
    models = list(client.models.list())
    assert [m.id for m in models] == ["current", "v0001", "v0002"]
    assert models[0].model_extra["root"] == "v0002" and all(m.created > 0 for m in models)
    assert client.models.retrieve("v0001").id == "v0001"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("v0009")


def test_chat_completions_answer_by_version_with_consistent_usage(app: App):
    client = app.client()
    current = _chat(client)
    choice = current.choices[0]
    assert current.object == "chat.completion" and current.model == "v0002" and len(current.choices) == 1
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    usage = current.usage
    assert usage.completion_tokens == 8 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the same greedy summary /v1/summarize writes: the document goes through the same prompt
    summary = requests.post(app.url + "/v1/summarize", json={"text": TEXT, "max_new_tokens": 8}, timeout=60,
                            headers={"Authorization": f"Bearer {app.token}"}).json()
    assert summary["summary"] == choice.message.content
    assert _chat(client, model="v0002").choices[0].message.content == choice.message.content
    full = _chat(client, model="v0001")  # the full version under the adapter
    assert full.model == "v0001" and full.choices[0].message.content != choice.message.content
    with_system = client.chat.completions.create(model="current", temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": TEXT}])
    assert with_system.choices[0].message.content == choice.message.content  # it never reaches the model
    two = _chat(client, n=2, temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 16
    assert two.usage.prompt_tokens == usage.prompt_tokens  # the document counts once


def test_completions_of_several_documents_are_reproducible_with_a_seed(app: App):
    client = app.client()
    ask = {"model": "current", "prompt": [TEXT, OTHER], "n": 2, "seed": 11, "max_tokens": 6}
    first = client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert first.object == "text_completion" and [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts[0] != texts[1] and all(texts)  # choice i samples with seed + i
    assert [c.text for c in client.completions.create(**ask).choices] == texts
    assert first.usage.completion_tokens == 4 * 6
    alone = [client.completions.create(model="v0002", prompt=prompt, max_tokens=1, temperature=0)
             for prompt in (TEXT, OTHER)]
    assert first.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


def test_streams_end_with_done_and_join_to_the_completion(app: App):
    client = app.client()
    whole = _chat(client).choices[0].message.content
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8
    pieces = list(client.completions.create(model="current", prompt=TEXT, max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole
    assert pieces[-1].choices[0].finish_reason == "length"


def test_stop_cuts_and_max_tokens_is_capped_at_the_serving_limit(app: App):
    client = app.client()
    capped = _chat(client, max_tokens=1000)
    text = capped.choices[0].message.content
    assert capped.usage.completion_tokens == MAX_NEW_TOKENS and capped.choices[0].finish_reason == "length"
    stop = text[5:7]
    cut = _chat(client, max_tokens=1000, stop=[stop, "never in it \u2603"]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (text[:text.find(stop)], "stop")


def _bad_parameters(client: openai.OpenAI) -> dict[str, object]:
    """param -> a call that sends a bad value for it."""
    return {
        "temperature": lambda: _chat(client, temperature=-1),
        "n": lambda: _chat(client, n=0),
        "top_p": lambda: _chat(client, top_p=0),
        "logprobs": lambda: _chat(client, logprobs=True),  # not supported: refused, not ignored
        "frequency_penalty": lambda: _chat(client, frequency_penalty=0.5),
        "stop": lambda: _chat(client, stop=["a", "b", "c", "d", "e"]),
        "unknown_field": lambda: _chat(client, extra_body={"unknown_field": 1}),
        "messages": lambda: client.chat.completions.create(
            model="current", messages=[{"role": "assistant", "content": TEXT}]),
        "prompt[0]": lambda: client.completions.create(model="current", prompt=[[1, 2, 3]]),
    }


def test_bad_input_answers_openai_errors_naming_the_parameter_never_500(app: App):
    client = app.client()
    for param, call in _bad_parameters(client).items():
        with pytest.raises(openai.BadRequestError) as caught:
            call()  # type: ignore[operator]
        assert caught.value.status_code == 400 and caught.value.param == param, caught.value.body
        assert caught.value.type == "invalid_request_error" and param in caught.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        _chat(client, model="gpt-4o", stream=True)
    assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.APIStatusError) as large:
        _chat(client, text="x" * 20_001)
    assert (large.value.status_code, large.value.param) == (413, "messages")
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model="current", prompt=[TEXT, OTHER], n=9)
    assert too_many.value.param == "n"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {app.token}"}
    not_json = requests.post(app.url + "/v1/completions", data="{oops", headers=headers, timeout=60)
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
    # A body over serve.max_json_bytes is refused unread by the front door, in the same shape.
    unread = requests.post(app.url + "/v1/chat/completions", data=b"x" * 1_000_001, headers=headers,
                           timeout=60)
    assert unread.status_code == 413 and unread.json()["error"]["code"] == "request_too_large", unread.text


def test_the_api_key_is_a_labeler_token_and_the_rate_limit_answers_429(app: App):
    with pytest.raises(openai.AuthenticationError) as refused:
        _chat(app.client(api_key="not-a-labeler-token"))
    assert refused.value.type == "authentication_error" and "Bearer" in refused.value.message
    bob = app.client(api_key=app.labeler("bob"))
    answered = 0
    with pytest.raises(openai.RateLimitError) as limited:
        while answered < PER_LABELER + 10:  # cheap requests: admitted, then 404 before any generation
            with pytest.raises(openai.NotFoundError):
                _chat(bob, model="no-such-version")
            answered += 1
    assert answered >= PER_LABELER  # the burst, then 429 (a token refills every 1.5 s)
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert (limited.value.code, limited.value.type) == ("rate_limit_exceeded", "rate_limit_error")
