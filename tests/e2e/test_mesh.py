"""Remote inference through the mesh: a pod without models answers with a peer's models, and a
stream survives the serving peer being killed."""

import signal
import time

import openai
import pytest
from conftest import CHAT, EMBED, Pod

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def client(pod):
    return openai.OpenAI(base_url=pod.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_for_model(front: Pod, model: str, providers: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = {m["id"]: m for m in front.get("/v1/models")["data"]}
        if model in listed and listed[model]["providers"] >= providers:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{model} not served by {providers} peers through {front.base}:\n{front.output()}")


def greedy(c, max_tokens, stream=False):
    return c.chat.completions.with_raw_response.create(
        model=CHAT, messages=PROMPT, temperature=0, max_tokens=max_tokens, stream=stream)


@pytest.fixture(scope="module")
def pair():
    a = Pod("--announce-interval", "1")
    b = Pod("--profile", "relay", "--announce-interval", "1", "--bootstrap", a.p2p_addr(), models=())
    try:
        wait_for_model(b, CHAT, 1)
        wait_for_model(b, EMBED, 1)
        yield a, b
    finally:
        b.stop()
        a.stop()


def test_a_pod_without_models_answers_with_a_peers_model(pair):
    a, b = pair
    direct = greedy(client(a), 40)
    routed = greedy(client(b), 40)
    assert routed.headers["x-pod-served-by"] == a.peer_id
    assert direct.headers["x-pod-served-by"] == a.peer_id
    assert routed.parse().choices[0].message.content == direct.parse().choices[0].message.content
    assert routed.parse().usage.completion_tokens == 40

    stream = greedy(client(b), 40, stream=True)
    assert stream.headers["x-pod-served-by"] == a.peer_id
    text = "".join(ch.choices[0].delta.content or "" for ch in stream.parse() if ch.choices)
    assert text == direct.parse().choices[0].message.content


def test_embeddings_through_the_mesh_equal_local_ones(pair):
    a, b = pair
    direct = client(a).embeddings.with_raw_response.create(model=EMBED, input=["a lighthouse", "the sea"])
    routed = client(b).embeddings.with_raw_response.create(model=EMBED, input=["a lighthouse", "the sea"])
    assert routed.headers["x-pod-served-by"] == a.peer_id
    for x, y in zip(direct.parse().data, routed.parse().data):
        assert x.embedding == pytest.approx(y.embedding, abs=1e-6)
    assert routed.parse().usage.prompt_tokens == direct.parse().usage.prompt_tokens


def test_models_list_counts_providers_and_receipts_are_kept(pair):
    a, b = pair
    models = {m["id"]: m for m in b.get("/v1/models")["data"]}
    assert models[CHAT]["providers"] == 1
    greedy(client(b), 8)
    consumed = {r["peer"]: r for r in b.get("/pod/v1/receipts")["data"]}
    served = {r["peer"]: r for r in a.get("/pod/v1/receipts")["data"]}
    assert consumed[a.peer_id]["consumed"]["requests"] >= 1
    assert served[b.peer_id]["served"]["completion_tokens"] == consumed[a.peer_id]["consumed"]["completion_tokens"]
    assert b.get("/pod/v1/receipts")["invalid"] == 0


def test_unknown_models_are_404_through_the_mesh(pair):
    _, b = pair
    with pytest.raises(openai.NotFoundError):
        client(b).chat.completions.create(model="no-such-model", messages=PROMPT, max_tokens=4)


def test_a_stream_survives_its_serving_peer_being_killed():
    a = Pod("--announce-interval", "1", models=(CHAT,))
    c = Pod("--announce-interval", "1", "--bootstrap", a.p2p_addr(), models=(CHAT,))
    b = Pod("--profile", "relay", "--announce-interval", "1", "--bootstrap", a.p2p_addr(), models=())
    pods = {a.peer_id: a, c.peer_id: c}
    try:
        wait_for_model(b, CHAT, 2)
        reference = greedy(client(a), 160).parse().choices[0].message.content
        raw = greedy(client(b), 160, stream=True)
        victim_id = raw.headers["x-pod-served-by"]
        victim = pods[victim_id]
        survivor = c if victim is a else a
        parts, finish, killed = [], None, False
        for chunk in raw.parse():
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
            if not killed and len(parts) >= 30:
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(timeout=10)
                killed = True
        assert killed, "the stream ended before the serving pod could be killed"
        assert finish == "length"
        assert "".join(parts) == reference
        receipts = {r["peer"]: r["consumed"] for r in b.get("/pod/v1/receipts")["data"]}
        assert receipts[victim_id]["completion_tokens"] >= 8, receipts
        assert receipts[survivor.peer_id]["completion_tokens"] > 0, receipts
        total = receipts[victim_id]["completion_tokens"] + receipts[survivor.peer_id]["completion_tokens"]
        assert total <= 160
    finally:
        for p in (b, c, a):
            p.stop()

