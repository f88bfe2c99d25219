"""The official `openai` Python client against `tiefsee serve` on the tiny random fixture model.

The model's text is gibberish by design, so the tests check the API's shape and its invariants: usage
adds up (DeepSeek's cache-hit fields included, read through pydantic's `model_extra`), greedy decoding
gives the same text streamed or not, errors come back as the client's typed exceptions naming the field,
stop strings cut the text, a client that leaves is cancelled, a full queue answers 429, and the R1
template's reasoning arrives as `reasoning_content`, `n` choices come back indexed (streamed or not)
with usage summed, and logprobs parse into the client's types. Run with tests/e2e_api/run.sh.
"""

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import API_KEY

HERE = Path(__file__).parent
MAX_TOKENS = 12
MESSAGES = [{"role": "user", "content": "Grüße aus München"}]
# Well over one 16-token cache block, so a repeat of it hits the prefix cache.
LONG_PROMPT = " ".join(f"Zeile {i}: der schnelle braune Fuchs springt über den faulen Hund." for i in range(8))


def cache_fields(usage) -> tuple[int, int]:
    extra = usage.model_extra or {}
    assert "prompt_cache_hit_tokens" in extra and "prompt_cache_miss_tokens" in extra, extra
    hit, miss = extra["prompt_cache_hit_tokens"], extra["prompt_cache_miss_tokens"]
    assert hit + miss == usage.prompt_tokens
    return hit, miss


def check_usage(usage, finish_reason: str, max_tokens: int = MAX_TOKENS) -> None:
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The random model may emit its end token early; otherwise exactly max_tokens come back.
    assert finish_reason in ("length", "stop")
    if finish_reason == "length":
        assert usage.completion_tokens == max_tokens
    else:
        assert 0 < usage.completion_tokens <= max_tokens
    cache_fields(usage)


def stream_chat(client, model_id, **kwargs):
    """Streams a chat completion; returns (content, reasoning, finish_reason, usage, chunk count)."""
    content, reasoning, finish, usage, chunks = [], [], None, None, 0
    stream = client.chat.completions.create(model=model_id, stream=True, **kwargs)
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                content.append(choice.delta.content)
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                reasoning.append(extra["reasoning_content"])
            if choice.finish_reason is not None:
                assert finish is None, "two chunks carried a finish_reason"
                finish = choice.finish_reason
    return "".join(content), "".join(reasoning), finish, usage, chunks


def test_models_list(client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].id == "deepseek-v3"
    assert models[0].object == "model"


def test_chat_completion(client, model_id):
    response = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    check_usage(response.usage, choice.finish_reason)
    details = response.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens == 0


def test_chat_streaming_with_usage(client, model_id):
    content, reasoning, finish, usage, chunks = stream_chat(
        client, model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        stream_options={"include_usage": True},
    )
    assert content and not reasoning
    assert chunks >= 3
    assert usage is not None, "include_usage asked for a usage chunk"
    check_usage(usage, finish)


def test_chat_streaming_without_usage(client, model_id):
    _, _, finish, usage, _ = stream_chat(
        client, model_id, messages=MESSAGES, max_tokens=4, temperature=0
    )
    assert finish in ("length", "stop")
    assert usage is None


def test_greedy_chat_stream_equals_non_stream(client, model_id):
    kwargs = dict(messages=MESSAGES, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(model=model_id, **kwargs)
    content, _, finish, usage, _ = stream_chat(
        client, model_id, stream_options={"include_usage": True}, **kwargs
    )
    assert content == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    again = client.chat.completions.create(model=model_id, **kwargs)
    assert again.choices[0].message.content == whole.choices[0].message.content


def test_prefix_cache_hit_reported(client, model_id):
    messages = [{"role": "user", "content": LONG_PROMPT}]
    first = client.chat.completions.create(model=model_id, messages=messages, max_tokens=2, temperature=0)
    second = client.chat.completions.create(model=model_id, messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 32
    hit, miss = cache_fields(second.usage)
    assert hit >= 16, f"the repeated prompt of {second.usage.prompt_tokens} tokens hit {hit} cached tokens"
    assert miss >= 1


def test_completions(client, model_id):
    response = client.completions.create(
        model=model_id, prompt="Es war einmal", max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.object == "text_completion"
    assert len(response.choices) == 1
    assert isinstance(response.choices[0].text, str) and response.choices[0].text
    check_usage(response.usage, response.choices[0].finish_reason)

    # The same greedy continuation streamed, and from token ids.
    pieces, finish = [], None
    for chunk in client.completions.create(
        model=model_id, prompt="Es war einmal", max_tokens=MAX_TOKENS, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == response.choices[0].text
    assert finish == response.choices[0].finish_reason


def test_completions_token_ids(client, model_id):
    response = client.completions.create(
        model=model_id, prompt=[0, 5, 6, 7, 8], max_tokens=4, temperature=0
    )
    assert response.usage.prompt_tokens == 5
    check_usage(response.usage, response.choices[0].finish_reason, max_tokens=4)


def test_api_key(keyed_url):
    right = openai.OpenAI(base_url=keyed_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert right.models.list().data
    response = right.chat.completions.create(
        model="deepseek-v3", messages=MESSAGES, max_tokens=2, temperature=0
    )
    assert response.usage.completion_tokens >= 1
    wrong = openai.OpenAI(base_url=keyed_url + "/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as error:
        wrong.chat.completions.create(model="deepseek-v3", messages=MESSAGES, max_tokens=2)
    assert error.value.status_code == 401
    assert error.value.type == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(temperature=3.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(n=100), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=100_000), "max_tokens"),
        (dict(max_completion_tokens=100_000), "max_completion_tokens"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
        (
            dict(messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]),
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_chat_request(client, model_id, kwargs, param):
    kwargs = {"messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, **kwargs)
    assert error.value.status_code == 400
    assert error.value.param == param, error.value.message
    assert error.value.type == "invalid_request_error"


def test_bad_completion_request(client, model_id):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_id, prompt=[1, 10**6], max_tokens=2)
    assert error.value.param == "prompt"
    assert "1000000" in error.value.message


def test_malformed_body_names_the_field(client, model_id):
    # Without `messages` the body does not deserialize; the message still names the field.
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=MESSAGES, extra_body={"messages": 5})
    assert "messages" in error.value.message


def test_reasoning_content(r1_url):
    client = openai.OpenAI(base_url=r1_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(model="r1", messages=MESSAGES, max_tokens=16, temperature=0)
    response = client.chat.completions.create(**kwargs)
    message = response.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert reasoning, "the R1 template opens <think>, so everything generated is reasoning"
    assert message.content == ""
    details = response.usage.completion_tokens_details
    assert details.reasoning_tokens == response.usage.completion_tokens

    content, streamed, _, usage, _ = stream_chat(
        client, "r1", messages=MESSAGES, max_tokens=16, temperature=0,
        stream_options={"include_usage": True},
    )
    assert content == ""
    assert streamed == reasoning
    assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sse(base_url):
    result = subprocess.run(
        ["bash", str(HERE / "test_sse_curl.sh"), base_url],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def metric(base_url: str, name: str) -> float:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def test_stop_string(client, model_id):
    kwargs = dict(model=model_id, prompt="Es war einmal", max_tokens=24, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    # Two ASCII letters or digits, from the middle on if there are any: whole characters, shown as
    # soon as their token arrives, so generation stops early (the Rust API tests try every window).
    starts = [*range(len(text) // 2, len(text) - 1), *range(len(text) // 2)]
    windows = [text[i:i + 2] for i in starts]
    usable = [w for w in windows if w.isascii() and w.isalnum()]
    assert usable, f"no usable stop string in {text!r}"
    stop = usable[0]
    cut = client.completions.create(stop=[stop], **kwargs)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.usage.completion_tokens < 24


def test_disconnect_cancels(client, model_id, base_url):
    before = metric(base_url, "tiefsee_requests_cancelled_total")
    stream = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=480, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while metric(base_url, "tiefsee_requests_cancelled_total") == before:
        assert time.monotonic() < deadline, "the engine did not cancel a request whose client left"
        time.sleep(0.05)
    while metric(base_url, "tiefsee_running_sequences") != 0:
        assert time.monotonic() < deadline, "the cancelled request still runs"
        time.sleep(0.05)


def test_queue_full_is_429(tight_url):
    client = openai.OpenAI(base_url=tight_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(model="deepseek-v3", messages=MESSAGES, max_tokens=480, temperature=0, stream=True)
    running = client.chat.completions.create(**kwargs)
    next(iter(running))  # admitted and decoding
    # `create` returns once the response headers arrive, i.e. once the engine has queued the request.
    waiting = client.chat.completions.create(**kwargs)
    try:
        with pytest.raises(openai.RateLimitError) as error:
            client.chat.completions.create(**kwargs)
        assert error.value.status_code == 429
    finally:
        running.close()
        waiting.close()


@pytest.mark.parametrize("prompt", [[], [0] + [5] * 600], ids=["empty", "longer-than-context"])
def test_completion_prompt_errors_name_prompt(client, model_id, prompt):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_id, prompt=prompt, max_tokens=4)
    assert error.value.param == "prompt", error.value.message


@pytest.mark.parametrize(("name", "value"), [("temperature", "hot"), ("max_tokens", -1), ("top_k", "many")])
def test_type_errors_name_the_field(client, model_id, name, value):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=MESSAGES, extra_body={name: value})
    assert name in error.value.message or error.value.param == name, error.value.message


def test_n_greedy_choices_equal_one_choice(client, model_id):
    kwargs = dict(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    one = client.chat.completions.create(**kwargs)
    many = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert {c.message.content for c in many.choices} == {one.choices[0].message.content}
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    assert many.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert many.usage.total_tokens == many.usage.prompt_tokens + many.usage.completion_tokens


def test_n_seeded_choices_are_reproducible_and_differ(client, model_id):
    kwargs = dict(model=model_id, prompt="Es war einmal", max_tokens=MAX_TOKENS, temperature=1.0, seed=5, n=3)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    second = [c.text for c in client.completions.create(**kwargs).choices]
    assert first == second
    assert len(set(first)) == 3, first


def test_n_streaming_delivers_every_choice(client, model_id):
    kwargs = dict(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=9, n=3)
    whole = client.chat.completions.create(**kwargs)
    content, finish, usage = ["", "", ""], [None, None, None], None
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            assert finish[choice.index] is None, "a delta after the choice finished"
            content[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason
    assert content == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_share_the_prompt_cache(client, model_id, base_url):
    before = metric(base_url, "tiefsee_prefix_cache_hit_tokens_total")
    response = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "n=3: " + LONG_PROMPT}], max_tokens=2, temperature=0, n=3
    )
    prompt = response.usage.prompt_tokens
    # Choices 1 and 2 find every full 16-token block of the prompt that choice 0 computed.
    assert metric(base_url, "tiefsee_prefix_cache_hit_tokens_total") - before >= 2 * ((prompt - 1) // 16 * 16)


def check_top(entry, k):
    assert len(entry.top_logprobs) == k
    tops = [t.logprob for t in entry.top_logprobs]
    assert tops == sorted(tops, reverse=True)
    # Greedy: the token taken is the most likely one.
    assert entry.logprob == tops[0]
    assert entry.bytes == list(entry.token.encode())


def test_chat_logprobs(client, model_id):
    kwargs = dict(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=3)
    response = client.chat.completions.create(**kwargs)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens
    for entry in entries:
        check_top(entry, 3)
    streamed, usage = [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, entries))
    assert len(streamed) == usage.completion_tokens


def test_completion_logprobs(client, model_id):
    response = client.completions.create(model=model_id, prompt="Es war einmal", max_tokens=MAX_TOKENS,
                                         temperature=0, logprobs=2)
    lp = response.choices[0].logprobs
    n = response.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    offset = 0
    for token, logprob, top, at in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert at == offset
        offset += len(token)
        assert top[token] == logprob == max(top.values())
