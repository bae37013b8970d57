"""The official OpenAI Python SDK, unmodified, against a real `pod start` process."""

import math
import signal
import subprocess
import tempfile
import time

import openai
import pytest
from conftest import CHAT, EMBED, MESH_ON_LOOPBACK, Pod, free_port, pod_command


def client(pod, key="unused"):
    return openai.OpenAI(base_url=pod.base + "/v1", api_key=key, max_retries=0, timeout=120)


def test_lists_models(pod):
    ids = {m.id for m in client(pod).models.list()}
    assert {CHAT, EMBED} <= ids


def test_chat_streaming_equals_non_streaming(pod):
    c = client(pod)
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = c.chat.completions.create(model=CHAT, messages=messages, temperature=0, seed=1, max_tokens=24)
    text = whole.choices[0].message.content
    assert text
    assert whole.usage.completion_tokens == 24
    assert whole.choices[0].finish_reason == "length"
    stream = c.chat.completions.create(model=CHAT, messages=messages, temperature=0, seed=1, max_tokens=24,
                                       stream=True, stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert "".join(parts) == text
    assert finish == "length"
    assert usage.completion_tokens == 24
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_seeded_sampling_is_reproducible(pod):
    c = client(pod)
    kw = dict(model=CHAT, messages=[{"role": "user", "content": "Invent a name for a cat."}],
              temperature=1.0, top_p=0.95, seed=42, max_tokens=16)
    a = c.chat.completions.create(**kw).choices[0].message.content
    b = c.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_completions_and_json_mode(pod):
    c = client(pod)
    r = c.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.choices[0].text
    assert r.usage.completion_tokens <= 6
    r = c.chat.completions.create(
        model=CHAT, temperature=0, max_tokens=400, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a dog as a JSON object with keys name and age."}])
    import json
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_embeddings_are_unit_vectors(pod):
    c = client(pod)
    # The SDK asks for base64 by default and decodes it itself.
    r = c.embeddings.create(model=EMBED, input=["A cat sits on the mat.", "Quantum physics."])
    assert len(r.data) == 2
    for d in r.data:
        assert len(d.embedding) == 384
        assert abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-3
    f = c.embeddings.create(model=EMBED, input="A cat sits on the mat.", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(f.data[0].embedding, r.data[0].embedding)) < 1e-6


def test_errors_map_to_sdk_exceptions(pod):
    c = client(pod)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "word " * 10000}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=CHAT, messages=[])


def test_api_keys():
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write("sk-pod-test\n")
    keyed = Pod("--api-key-file", f.name)
    try:
        with pytest.raises(openai.AuthenticationError):
            client(keyed, key="sk-wrong").models.list()
        ids = {m.id for m in client(keyed, key="sk-pod-test").models.list()}
        assert CHAT in ids
        assert "sk-pod-test" not in keyed.output()
    finally:
        keyed.stop()


def test_public_bind_without_keys_is_refused():
    home = tempfile.mkdtemp(prefix="pod-e2e-home-")
    r = subprocess.run([*pod_command(home), "start", "--profile", "relay", *MESH_ON_LOOPBACK,
                        "--api-host", "0.0.0.0", "--api-port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "without API keys" in r.stderr


def test_sigterm_stops_gracefully():
    p = Pod()
    start = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=20) == 0
    assert time.monotonic() - start < 15
    assert "stopped" in p.output()
