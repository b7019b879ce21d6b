"""The real launcher on the default model, driven by the real `lorax-client` and `openai` SDKs."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from launcher_process import Launcher, launcher
from lorax import AsyncClient, Client
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
CHAT_PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    with launcher(
        default_model_path,
        tmp_path_factory.mktemp("launcher"),
        "--max-concurrent-requests",
        "80",
        "--body-read-timeout-s",
        "2",
        "--keep-alive-timeout-s",
        "8",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def hf(default_model_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)

    def greedy(prompt: str, max_new_tokens: int, add_special_tokens: bool = True) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, ids.shape[1] :].tolist()

    greedy.tokenizer = tokenizer  # type: ignore[attr-defined]
    return greedy


def base_model(server: Launcher) -> str:
    """The served model's id: OpenAI's `model` names an adapter unless it is the base model's id."""
    return str(requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"])


def metrics(server: Launcher) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_lorax_client_greedy_equals_transformers(server: Launcher, hf) -> None:
    expected = hf(CHAT_PROMPT, 24)
    response = Client(server.url).generate(CHAT_PROMPT, max_new_tokens=24, decoder_input_details=True)
    assert [t.id for t in response.details.tokens] == expected
    assert response.generated_text == hf.tokenizer.decode(expected, skip_special_tokens=True)
    assert response.generated_text == "The capital of France is Paris."
    assert response.details.finish_reason.value == "eos_token"
    assert len(response.details.prefill) == response.details.prompt_tokens
    assert all(isinstance(t.logprob, float) for t in response.details.tokens)


def test_lorax_client_stream_equals_non_stream_sync_and_async(server: Launcher) -> None:
    prompt = "Once upon a time, in a small village,"
    client = Client(server.url)
    full = client.generate(prompt, max_new_tokens=30).generated_text
    events = list(client.generate_stream(prompt, max_new_tokens=30))
    assert events[-1].generated_text == full
    assert "".join(e.token.text for e in events if not e.token.special) == full
    assert events[-1].details.generated_tokens == len(events)

    async def run_async() -> tuple[str, str]:
        a = AsyncClient(server.url)
        text = (await a.generate(prompt, max_new_tokens=30)).generated_text
        streamed = [e async for e in a.generate_stream(prompt, max_new_tokens=30)]
        return text, streamed[-1].generated_text

    assert asyncio.run(run_async()) == (full, full)


def test_openai_chat_and_completions_streamed_and_not(server: Launcher, hf) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(
        model=base_model(server),
        messages=messages,
        temperature=0,
        max_tokens=24,
        logprobs=True,
        top_logprobs=2,
    )
    expected = hf(CHAT_PROMPT, 24)
    assert chat.choices[0].message.content == hf.tokenizer.decode(expected, skip_special_tokens=True)
    assert chat.object == "chat.completion" and chat.choices[0].finish_reason == "stop"
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens == len(expected)
    chunks = list(
        client.chat.completions.create(
            model=base_model(server),
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    prompt = "The three primary colors are"
    done = client.completions.create(
        model=base_model(server), prompt=prompt, temperature=0, max_tokens=12, logprobs=2
    )
    assert done.choices[0].text == hf.tokenizer.decode(hf(prompt, 12), skip_special_tokens=True)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 12
    streamed = client.completions.create(
        model=base_model(server), prompt=prompt, temperature=0, max_tokens=12, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    assert [m.id for m in client.models.list().data]


def test_stop_sequences_follow_each_api(server: Launcher) -> None:
    lorax = Client(server.url).generate(CHAT_PROMPT, max_new_tokens=24, stop_sequences=["France"])
    assert lorax.generated_text == "The capital of France"
    assert lorax.details.finish_reason.value == "stop_sequence"
    chat = openai.OpenAI(base_url=server.url + "/v1", api_key="unused").chat.completions.create(
        model=base_model(server),
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=24,
        stop=["France"],
    )
    assert chat.choices[0].message.content == "The capital of "
    assert chat.choices[0].finish_reason == "stop"


def test_64_concurrent_requests_complete_with_the_same_tokens_as_alone(server: Launcher) -> None:
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    client = Client(server.url)
    alone = {p: client.generate(p, max_new_tokens=10).generated_text for p in prompts}

    async def crowd() -> list[tuple[str, str]]:
        a = AsyncClient(server.url, timeout=300)

        async def one(p: str) -> tuple[str, str]:
            return p, (await a.generate(p, max_new_tokens=10)).generated_text

        return list(await asyncio.gather(*(one(prompts[i % 8]) for i in range(64))))

    results = asyncio.run(crowd())
    assert len(results) == 64
    assert all(text == alone[p] for p, text in results)
    m = metrics(server)
    assert m["lorax_kv_blocks_used"] == 0 and m["lorax_batch_current_size"] == 0
    assert m["lorax_request_success_total"] >= 72
    # Every step's time splits into the workers' own part and the router's overhead around it.
    steps = m["lorax_batch_inference_duration_count"]
    assert steps > 0 and m["lorax_router_step_overhead_seconds_count"] == steps
    assert 0 < m["lorax_router_step_overhead_seconds_sum"] < m["lorax_batch_inference_duration_sum"]


BAD_REQUESTS = [
    ("/generate", "not json", 422, "not valid JSON"),
    ("/generate", [1, 2], 422, "JSON object"),
    ("/generate", {}, 422, "inputs"),
    ("/generate", {"inputs": ""}, 422, "inputs"),
    ("/generate", {"inputs": 5}, 422, "inputs"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": 0}}, 422, "temperature"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": "hot"}}, 422, "temperature"),
    ("/generate", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 422, "top_p"),
    ("/generate", {"inputs": "hi", "parameters": {"top_k": 0}}, 422, "top_k"),
    ("/generate", {"inputs": "hi", "parameters": {"typical_p": 2}}, 422, "typical_p"),
    ("/generate", {"inputs": "hi", "parameters": {"repetition_penalty": -1}}, 422, "repetition_penalty"),
    ("/generate", {"inputs": "hi", "parameters": {"frequency_penalty": 3}}, 422, "frequency_penalty"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 422, "max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 10**9}}, 422, "max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, 422, "stop"),
    ("/generate", {"inputs": "hi", "parameters": {"seed": -3}}, 422, "seed"),
    ("/generate", {"inputs": "hi", "parameters": {"truncate": 0}}, 422, "truncate"),
    ("/generate", {"inputs": "hi", "parameters": {"best_of": 9}}, 422, "best_of"),
    (
        "/generate",
        {"inputs": "hi", "parameters": {"return_k_alternatives": 100}},
        422,
        "return_k_alternatives",
    ),
    ("/generate", {"inputs": "word " * 9000}, 422, "inputs"),
    ("/generate_stream", {"inputs": "hi", "parameters": {"top_p": 0}}, 422, "top_p"),
    ("/tokenize", {}, 422, "inputs"),
    ("/nope", {}, 404, "Not Found"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": -1},
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2}},
        400,
        "logit_bias",
    ),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {}, 400, "prompt"),
]


def test_bad_requests_get_4xx_naming_the_problem_and_the_server_keeps_serving(server: Launcher) -> None:
    for path, body, status, needle in BAD_REQUESTS:
        data = body if isinstance(body, str) else json.dumps(body)
        r = requests.post(server.url + path, data=data, timeout=30)
        assert r.status_code == status, (path, body, r.text)
        payload = r.json()
        message = payload["error"]["message"] if path.startswith("/v1/") else payload["error"]
        assert needle in message, (path, body, payload)
    wrong_method = requests.get(server.url + "/generate", timeout=10)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    huge = requests.post(server.url + "/generate", data=b"x" * (5 * 2**20), timeout=30)
    assert huge.status_code == 413 and "error" in huge.json()
    assert Client(server.url).generate(CHAT_PROMPT, max_new_tokens=8).generated_text


def test_a_disconnected_stream_is_released_and_its_blocks_freed(server: Launcher) -> None:
    body = {
        "inputs": "Tell me a very long story.",
        "parameters": {"max_new_tokens": 400, "ignore_eos_token": True},
    }
    with requests.post(server.url + "/generate_stream", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        first = [next(lines) for _ in range(4)]
        assert any(line.startswith(b"data:") for line in first)
        assert metrics(server)["lorax_kv_blocks_used"] > 0
    deadline = time.monotonic() + 20
    while metrics(server)["lorax_kv_blocks_used"] > 0:
        assert time.monotonic() < deadline, "blocks of a disconnected request were not freed"
        time.sleep(0.2)
    assert metrics(server)["lorax_batch_current_size"] == 0


def test_info_health_and_tokenize(server: Launcher, hf) -> None:
    info = requests.get(server.url + "/info", timeout=10).json()
    assert info["max_total_tokens"] > info["max_input_length"] > 0
    # CPU serves the torch paths: nothing for the startup self-check to switch.
    assert info["kernel_paths"]["attention"] == "sdpa" and info["kernel_paths"]["decode"] == "eager"
    assert info["self_check_failures"] == {}
    text = requests.get(server.url + "/metrics", timeout=10).text
    assert 'lorax_kernel_path{implementation="sdpa",path="attention"} 1.0' in text
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    tokens = requests.post(server.url + "/tokenize", json={"inputs": QUESTION}, timeout=10).json()
    assert [t["id"] for t in tokens] == hf.tokenizer(QUESTION).input_ids


def test_memory_pressure_preempts_every_request_still_completes_and_a_dead_shard_stops_the_launcher(
    default_model_path: Path, tmp_path: Path
) -> None:
    """One launch for two behaviours: preemption under memory pressure, then (with --max-restarts 0)
    the launcher exits non-zero once its shard is killed."""
    prompts = [f"Write the number {i} in words, then count upwards:" for i in range(8)]
    # Room for 160 cached tokens: eight requests of ~60 tokens cannot all stay resident.
    args = ("--max-batch-total-tokens", "160", "--max-restarts", "0")
    with launcher(default_model_path, tmp_path, *args) as s:
        client = Client(s.url)
        alone = {
            p: client.generate(p, max_new_tokens=48, ignore_eos_token=True).generated_text for p in prompts
        }

        async def crowd() -> list[tuple[str, str]]:
            a = AsyncClient(s.url, timeout=300)

            async def one(p: str) -> tuple[str, str]:
                return p, (await a.generate(p, max_new_tokens=48, ignore_eos_token=True)).generated_text

            return list(await asyncio.gather(*(one(p) for p in prompts)))

        results = asyncio.run(crowd())
        m = metrics(s)
        assert all(text == alone[p] for p, text in results)
        assert m["lorax_preemptions"] > 0
        assert m["lorax_kv_blocks_used"] == 0

        children = subprocess.run(
            ["pgrep", "-P", str(s.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert children, "the launcher runs its shard as a child process"
        subprocess.run(["kill", "-9", children[0]], check=True)
        assert s.proc.wait(timeout=60) != 0
        assert "shard 0 exited" in s.log()


def test_overload_answers_429_at_once_and_sigterm_ends_the_request_in_flight_and_exits_cleanly(
    default_model_path: Path, tmp_path: Path
) -> None:
    """One launch (--max-concurrent-requests 1) for two behaviours: a request past the limit gets 429
    at once; SIGTERM ends the one in flight (unfinished after a 1 s grace) with an error event, exit 0."""
    body = {
        "inputs": "Tell me a long story.",
        "parameters": {"max_new_tokens": 2000, "ignore_eos_token": True},
    }
    args = ("--max-concurrent-requests", "1", "--shutdown-grace-period-s", "1")
    with launcher(default_model_path, tmp_path, *args) as s:
        with requests.post(s.url + "/generate_stream", json=body, stream=True, timeout=120) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the connection
            next(lines)
            second = requests.post(s.url + "/generate", json=body, timeout=10)
            chat = requests.post(
                s.url + "/v1/chat/completions",
                timeout=10,
                json={"messages": [{"role": "user", "content": "hi"}]},
            )
            s.proc.send_signal(signal.SIGTERM)
            events = [json.loads(line[5:]) for line in lines if line.startswith(b"data:")]
        assert s.proc.wait(timeout=60) == 0, s.log()
    assert second.status_code == 429 and second.json()["error_type"] == "overloaded"
    assert chat.status_code == 429 and chat.headers["Retry-After"] and chat.json()["error"]["type"]
    assert events and "error" in events[-1], (
        "an unfinished request ends with an error event, not a silent close"
    )


def test_openai_n_returns_independent_choices(server: Launcher) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    chat = client.chat.completions.create(
        model=base_model(server),
        messages=[{"role": "user", "content": "Name a fruit."}],
        n=3,
        max_tokens=8,
        temperature=1.0,
        logprobs=True,
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)
    assert chat.usage.prompt_tokens > 0


def test_a_disconnected_non_streaming_request_is_released(server: Launcher) -> None:
    # 2000 tokens take well over a minute here: only a release frees the blocks within the deadline.
    body = {
        "inputs": "Tell me a very long story.",
        "parameters": {"max_new_tokens": 2000, "ignore_eos_token": True},
    }
    with pytest.raises(requests.ReadTimeout):
        requests.post(server.url + "/generate", json=body, timeout=1.5)  # the client gives up and hangs up
    deadline = time.monotonic() + 10
    while metrics(server)["lorax_kv_blocks_used"] > 0 or metrics(server)["lorax_batch_current_size"] > 0:
        assert time.monotonic() < deadline, "the abandoned request was not released"
        time.sleep(0.2)


# Each of these once hung, crashed or stalled the server for everyone (a dead engine loop, a step
# every worker refused, a 500 in text/plain); each now gets a JSON 4xx naming the problem.
CHAT = [{"role": "user", "content": "hi"}]
HOSTILE_REQUESTS = [
    ("/generate", {"inputs": "hi", "parameters": {"top_k": 2**33}}, 422, "top_k"),
    ("/generate", {"inputs": "hi", "parameters": {"top_k": 10**6}}, 422, "vocabulary"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": 1e39}}, 422, "temperature"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": 1e-40}}, 422, "temperature"),
    ("/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 1e39}}, 422, "repetition_penalty"),
    ("/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 1e-37}}, 422, "repetition_penalty"),
    ("/generate", {"inputs": "hi", "parameters": {"presence_penalty": 1e39}}, 422, "presence_penalty"),
    ("/generate", {"inputs": "hi", "parameters": {"seed": 2**64}}, 422, "seed"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2**70}}, 422, "max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"stop": ["x" * 5000]}}, 422, "stop"),
    ("/generate_stream", {"inputs": "hi", "parameters": {"top_k": 2**40}}, 422, "top_k"),
    ("/v1/chat/completions", {"messages": CHAT, "top_k": 2**33}, 400, "top_k"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": 1e39}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e39}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, "seed"),
    # prompts × n is what runs: 90 and 200 generations against --max-concurrent-requests 80.
    ("/v1/completions", {"prompt": ["x"] * 10, "n": 9, "max_tokens": 1}, 400, "90 generations"),
    ("/v1/completions", {"prompt": ["x"] * 200, "max_tokens": 1}, 400, "200 generations"),
    ("/tokenize", {"inputs": "word " * 300_000}, 422, "inputs"),
    ("/generate", "[" * 100_000, 422, "nested too deeply"),
    ("/v1/chat/completions", '{"messages": ' + "[" * 100_000, 400, "nested too deeply"),
    ("/generate", '{"inputs": "hi", "parameters": {"seed": ' + "9" * 5000 + "}}", 422, "out of range"),
]


def test_hostile_requests_get_json_4xx_and_everyone_else_is_still_served(server: Launcher) -> None:
    for path, body, status, needle in HOSTILE_REQUESTS:
        data = body if isinstance(body, str) else json.dumps(body)
        r = requests.post(server.url + path, data=data, timeout=30)
        assert r.status_code == status, (path, str(body)[:200], r.text[:500])
        payload = r.json()
        message = payload["error"]["message"] if path.startswith("/v1/") else payload["error"]
        assert needle in message, (path, str(body)[:200], payload)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert Client(server.url).generate(CHAT_PROMPT, max_new_tokens=8).generated_text
    assert Client(server.url).generate("Hi", max_new_tokens=4, do_sample=True, top_k=5, seed=1).generated_text


def test_all_choices_of_a_request_are_admitted_together_or_not_at_all(server: Launcher) -> None:
    body = {
        "inputs": "Tell me a long story.",
        "parameters": {"max_new_tokens": 300, "ignore_eos_token": True},
    }
    many = {"prompt": ["Hi"] * 5, "n": 16, "max_tokens": 1}  # 80 generations: the whole limit
    with requests.post(server.url + "/generate_stream", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)  # one generation running: 80 more no longer fit
        crowded = requests.post(server.url + "/v1/completions", json=many, timeout=60)
        streamed = requests.post(server.url + "/v1/completions", json={**many, "stream": True}, timeout=60)
    assert crowded.status_code == 429 and crowded.json()["error"]["type"] == "rate_limit_error"
    assert streamed.status_code == 429
    deadline = time.monotonic() + 20
    while metrics(server)["lorax_batch_current_size"] > 0:
        assert time.monotonic() < deadline, "the abandoned stream was not released"
        time.sleep(0.2)
    alone = requests.post(server.url + "/v1/completions", json=many, timeout=120)
    assert alone.status_code == 200 and len(alone.json()["choices"]) == 80


def test_tokenizing_a_huge_input_does_not_hold_the_event_loop(server: Launcher) -> None:
    # About 3.9 MB of text takes seconds to tokenize here; /health must not wait for it.
    body = {"inputs": "word " * 780_000, "parameters": {"max_new_tokens": 1, "truncate": 8}}
    big: dict[str, float] = {}

    def send() -> None:
        requests.post(server.url + "/generate", json=body, timeout=120).raise_for_status()
        big["done"] = time.monotonic()

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)  # the body is in and being tokenized
    asked = time.monotonic()
    assert requests.get(server.url + "/health", timeout=60).status_code == 200
    answered = time.monotonic()
    sender.join(timeout=120)
    assert "done" in big, "the huge request itself is served"
    assert answered - asked < 0.5 * (big["done"] - asked), (answered - asked, big["done"] - asked)


def _raw(server: Launcher) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_a_body_sent_too_slowly_gets_408_and_the_connection_is_freed(server: Launcher) -> None:
    with _raw(server) as conn:
        conn.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"inputs": "'
        )
        started = time.monotonic()
        reply = conn.recv(4096)  # the rest never comes
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"not received within" in reply and time.monotonic() - started < 20


def test_a_connection_that_never_finishes_its_headers_is_closed(server: Launcher) -> None:
    with _raw(server) as conn:
        conn.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        started = time.monotonic()
        assert conn.recv(4096) == b"", "the server closes it"
    assert time.monotonic() - started < 25


def test_openai_n_choices_are_independent_samples_and_a_seed_reproduces_them(server: Launcher) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")

    def texts() -> list[str]:
        done = client.completions.create(
            model=base_model(server), prompt="Once upon a time", n=3, temperature=1.0, seed=5, max_tokens=12
        )
        assert [c.index for c in done.choices] == [0, 1, 2]
        return [c.text for c in done.choices]

    first = texts()
    assert len(set(first)) > 1, f"three samples came out identical: {first}"
    assert texts() == first, "the same seed gives the same choices"


def test_sigterm_exits_cleanly(server: Launcher) -> None:
    """Runs last: it stops the module's server (idle by now) instead of launching one more."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log()
