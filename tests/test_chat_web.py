"""
scripts/chat_web.py as users meet it: a real uvicorn server on 127.0.0.1 serving the tiny base model of
chat_base_dir (every answer is a word salad that runs to max_tokens), talked to over HTTP, from the page
in a real headless Chromium, with the official openai client, and by the hostile clients of
dev/probe_chat_web.py.
python -m pytest tests/test_chat_web.py -q
"""

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from dev import probe_chat_web as probe

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = [{"role": "user", "content": "Tell me about the river."}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base_dir, source, log_path, *flags, api_key=None):
    """A chat_web process serving `source` on a free port; returns (process, (host, port)) once it answers."""
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("NANOCHAT_API_KEY", None)
    if api_key:
        env["NANOCHAT_API_KEY"] = api_key
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", source, "-d", "float32",
                                 "--device-type", "cpu", "--port", str(port), *flags],
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"chat_web did not come up:\n{log_path.read_text()}")
        try:
            if get_json(("127.0.0.1", port), "/health")["status"] == "ok":
                return proc, ("127.0.0.1", port)
        except OSError:
            time.sleep(0.2)


# the limits of the module's server: small, so the probes reach them quickly
MAX_CONNECTIONS, MAX_QUEUE, CLIENT_TIMEOUT = 8, 1, 3
API_KEY = "test-key-4f1c"


@pytest.fixture(scope="module")
def server_process(chat_base_dir, tmp_path_factory):
    """(process, (host, port), log path) of a chat_web server of the word-salad base model, for the whole module."""
    log_path = tmp_path_factory.mktemp("chat_web") / "server.log"
    proc, address = start_server(chat_base_dir, "base", log_path,
                                 "--max-connections", str(MAX_CONNECTIONS), "--max-queue", str(MAX_QUEUE),
                                 "--client-timeout", str(CLIENT_TIMEOUT), "--allowed-hosts", "chat.example")
    # a server on CPU compiles its decode steps while it starts (the default for long-lived sessions): the one for
    # top-k draws and the one for greedy draws (temperature 0, as OpenAI clients often send)
    assert log_path.read_text().count("compiling the decode step") == 2
    assert "decoding eagerly" not in log_path.read_text()
    yield proc, address, log_path
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(server_process):
    """(host, port) of the module's server."""
    return server_process[1]


@pytest.fixture(scope="module")
def key_server(chat_base_dir, tmp_path_factory):
    """(host, port) of a server of the word-salad model that wants API_KEY (given in NANOCHAT_API_KEY)."""
    proc, address = start_server(chat_base_dir, "base", tmp_path_factory.mktemp("chat_web_key") / "server.log",
                                 "-m", "24", "--decode-mode", "eager", api_key=API_KEY)
    yield address
    proc.terminate()
    proc.wait(timeout=60)


def get_json(server, path):
    conn = http.client.HTTPConnection(*server, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        conn.close()


def post(server, body, headers=None):
    """Send a chat request; returns (connection, response) with the body unread."""
    conn = http.client.HTTPConnection(*server, timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    if len(data) > 1 << 20:
        # as curl sends a large body: headers first, asking with Expect: 100-continue; a server that refuses it on
        # its Content-Length answers at once, and sending the body anyway could meet the closed connection
        conn.putrequest("POST", "/chat/completions")
        for name, value in {**headers, "Content-Length": str(len(data)), "Expect": "100-continue"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        return conn, conn.getresponse()
    conn.request("POST", "/chat/completions", body=data, headers=headers)
    return conn, conn.getresponse()


def events(response):
    """The server-sent events of a streaming response, parsed, as they arrive."""
    while line := response.readline():
        line = line.decode("utf-8").rstrip("\n")
        if line:
            assert line.startswith("data: "), line
            yield json.loads(line[len("data: "):])


def chat(server, body, headers=None):
    """Token texts of a whole streamed answer; asserts it ends with done."""
    conn, response = post(server, body, headers)
    try:
        assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
        received = list(events(response))
    finally:
        conn.close()
    assert received[-1] == {"done": True} and all(set(e) == {"token"} for e in received[:-1])
    return [e["token"] for e in received[:-1]]


def wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_every_sampling_a_request_may_choose_was_compiled_while_starting(server_process):
    _, server, log_path = server_process
    compiled = log_path.read_text().count("compiling the decode step")
    for sampling in ({"temperature": 0.0}, {"temperature": 1.3, "top_k": 7}, {"temperature": 0.5, "top_k": 200}):
        assert len(chat(server, {"messages": QUESTION, "max_tokens": 6, **sampling})) == 6
    assert log_path.read_text().count("compiling the decode step") == compiled


def test_streamed_answer_and_page(server):
    tokens = chat(server, {"messages": QUESTION, "max_tokens": 12, "temperature": 1.0, "top_k": 20})
    assert len(tokens) == 12  # one event per token: this model writes whole words and runs to max_tokens
    assert re.fullmatch(r"( [a-z]+|[.,])+", "".join(tokens))
    # a conversation that goes on, with the server's default settings
    tokens = chat(server, {"messages": QUESTION + [{"role": "assistant", "content": "".join(tokens)},
                                                   {"role": "user", "content": "And then?"}], "max_tokens": 5})
    assert len(tokens) == 5
    conn = http.client.HTTPConnection(*server, timeout=60)
    conn.request("GET", "/")
    response = conn.getresponse()
    page = response.read().decode()
    conn.close()
    assert response.status == 200 and "<title>nanochat</title>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # self-contained: nothing fetched from elsewhere


def test_calculator_call_streams_and_comes_back(chat_base_dir, tmp_path):
    # the sft model of chat_base_dir answers every question with the calculator call 12*7
    proc, sft_server = start_server(chat_base_dir, "sft", tmp_path / "server.log", "--decode-mode", "eager")
    try:
        expected = "<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>"
        answer = "".join(chat(sft_server, {"messages": QUESTION, "temperature": 0.0}))
        assert answer == expected
        # the answer, sent back as streamed, is taken (test_chat checks it renders back to the same tokens)
        follow_up = QUESTION + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Again?"}]
        assert "".join(chat(sft_server, {"messages": follow_up, "temperature": 0.0})) == expected
        # through the OpenAI API: the model ended its turn, so finish_reason is stop (no key is needed here)
        reply = openai_client(sft_server, api_key="unused").chat.completions.create(
            model="nanochat", messages=QUESTION, temperature=0.0)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def turns(n, chars):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * chars} for i in range(n)]


BAD_REQUESTS = [
    # (what, body, status, words the message must hold)
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("no messages", {"messages": []}, 400, "non-empty list"),
    ("too many messages", {"messages": turns(501, 1)}, 400, "limit is 500"),
    ("message too long", {"messages": turns(1, 8001)}, 400, "limit is 8000"),
    ("conversation too long", {"messages": turns(5, 7000)}, 400, "limit is 32000"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "roles are"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, 400, '"content"'),
    ("empty question", {"messages": [{"role": "user", "content": "  "}]}, 400, "is empty"),
    ("turn order", {"messages": [{"role": "user", "content": "a"}] * 2}, 400, "alternate"),
    ("ends with an answer", {"messages": turns(2, 3)}, 400, "last message must be from the user"),
    ("temperature too high", {"messages": QUESTION, "temperature": 2.5}, 400,
     "temperature must be a number between 0.0 and 2.0"),
    ("temperature not a number", {"messages": QUESTION, "temperature": "hot"}, 400, "temperature must be a number"),
    ("top_k too small", {"messages": QUESTION, "top_k": 0}, 400, "top_k must be an integer between 1 and 200"),
    ("top_k too large", {"messages": QUESTION, "top_k": 201}, 400, "between 1 and 200"),
    ("top_k not an integer", {"messages": QUESTION, "top_k": 1.5}, 400, "top_k must be an integer"),
    ("max_tokens too small", {"messages": QUESTION, "max_tokens": 0}, 400,
     "max_tokens must be an integer between 1 and 4096"),
    ("max_tokens too large", {"messages": QUESTION, "max_tokens": 5000}, 400, "between 1 and 4096"),
    ("body too large", b" " * (1 << 20) + b"{}", 413, "limit is 1048576"),
    ("nested too deeply", b"[" * 100_000, 400, "nested too deeply"),
    ("integer of 5000 digits", b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", 400, "5000 digits, the limit is 32"),
    ("NaN", b'{"messages": [], "temperature": NaN}', 400, "NaN is not a JSON number"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "lone UTF-16 surrogate"),
    ("top_p", {"messages": QUESTION, "top_p": 0.9}, 400, "top_p=0.9 is not supported"),
    ("two answers", {"messages": QUESTION, "n": 2}, 400, "one answer per request"),
    ("stop not strings", {"messages": QUESTION, "stop": [1]}, 400, "stop must be a string or a list of up to 4"),
    ("five stop strings", {"messages": QUESTION, "stop": list("abcde")}, 400, "up to 4 strings"),
    ("seed negative", {"messages": QUESTION, "seed": -1}, 400, "seed must be an integer between 0 and"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "list of text parts"),
]


@pytest.mark.parametrize("what,body,status,message", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_refused_with_the_limit(server, what, body, status, message):
    conn, response = post(server, body)
    detail = json.loads(response.read())["detail"]
    conn.close()
    assert response.status == status and message in detail, (response.status, detail)


def test_body_over_the_limit_without_content_length_is_refused_as_it_streams_in(server):
    # chunked: the server counts as it reads and refuses once past 1 MiB, without waiting for the rest
    conn = http.client.HTTPConnection(*server, timeout=60)
    conn.putrequest("POST", "/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b" " * (64 << 10)
    for _ in range(17):  # 1 MiB + 64 KiB, and no final chunk: the rest never comes
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    response = conn.getresponse()
    detail = json.loads(response.read())["detail"]
    conn.close()
    assert response.status == 413 and "passed the limit of 1048576 bytes" in detail, (response.status, detail)


def test_request_refusals_leave_the_server_answering(server):
    # every refusal above, and a body of other type, did not break the server: it still answers
    conn = http.client.HTTPConnection(*server, timeout=60)
    conn.request("POST", "/chat/completions", body=json.dumps({"messages": QUESTION}),
                 headers={"Content-Type": "text/plain"})
    response = conn.getresponse()
    assert response.status == 415 and "Content-Type: application/json" in json.loads(response.read())["detail"]
    conn.close()
    # OpenAI's content parts and developer role, seed and max_completion_tokens are taken here too
    body = {"messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text",
                                                                                           "text": "a story."}]}],
            "max_completion_tokens": 6, "max_tokens": 99, "seed": 3}
    assert chat(server, body) == chat(server, body) and len(chat(server, body)) == 6


def test_conversation_longer_than_the_context_is_refused(server):
    # ~2 tokens per character here: 3 messages of 7000 characters are far more than the model's 4096 positions
    letters = " ".join("abcdefghij"[i % 10] for i in range(3500))
    messages = [{"role": role, "content": letters} for role in ("user", "assistant", "user")]
    conn, response = post(server, {"messages": messages})
    detail = json.loads(response.read())["detail"]
    conn.close()
    assert response.status == 400 and "the model's context is 4096" in detail


def test_two_concurrent_clients_queue_for_the_one_worker(server):
    before = get_json(server, "/stats")
    conn_a, response_a = post(server, {"messages": QUESTION, "max_tokens": 4000})
    stream_a = events(response_a)
    first = next(stream_a)
    assert "token" in first
    answers = {}
    second = threading.Thread(target=lambda: answers.update(b=chat(server, {"messages": QUESTION, "max_tokens": 30})))
    second.start()
    # the server answers while its only worker is busy, and the second client waits its turn
    health = wait_for(lambda: (h := get_json(server, "/health"))["waiting"] == 1 and h, "the second client to queue")
    assert health["free_workers"] == 0 and health["workers"] == 1
    # the queue holds MAX_QUEUE = 1 request: a third client is told to come back later
    conn_c, response_c = post(server, {"messages": QUESTION, "max_tokens": 5})
    detail = json.loads(response_c.read())["detail"]
    conn_c.close()
    assert response_c.status == 503 and response_c.getheader("Retry-After") == "5" and "--max-queue" in detail
    rest = list(stream_a)
    conn_a.close()
    second.join(timeout=300)
    assert rest[-1] == {"done": True} and len(rest) == 4000  # 4000 tokens in all: nothing lost to the other client
    assert len(answers["b"]) == 30
    after = get_json(server, "/stats")
    assert after["requests"] - before["requests"] == 2 and after["tokens"] - before["tokens"] == 4030
    assert after["unfinished"] == before["unfinished"]


def test_client_that_disconnects_frees_its_worker(server):
    before = get_json(server, "/stats")
    conn, response = post(server, {"messages": QUESTION, "max_tokens": 4000})
    stream = events(response)
    assert "token" in next(stream) and "token" in next(stream)
    conn.sock.shutdown(socket.SHUT_RDWR)  # leave mid-answer
    conn.close()
    wait_for(lambda: get_json(server, "/health")["free_workers"] == 1, "the worker to come back")
    after = get_json(server, "/stats")
    assert after["unfinished"] == before["unfinished"] + 1
    assert 2 <= after["tokens"] - before["tokens"] < 4000  # generation stopped early instead of running to the end
    assert len(chat(server, {"messages": QUESTION, "max_tokens": 10})) == 10  # and the next client gets the worker


# -----------------------------------------------------------------------------
# The page, in a real headless Chromium


def chromium_driver(tmp_path):
    """A selenium driver of the system's chromium; skipped where it is missing, except in CI (.ci/run installs it)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        message = "needs Debian's chromium and chromium-driver packages (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=960,860"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def throttle(driver, bytes_per_second):
    """Limit the page's download speed (None: no limit), through the Chrome DevTools protocol."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "uploadThroughput": -1, "downloadThroughput": bytes_per_second or -1})


def test_page_in_a_browser(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium_driver(tmp_path)
    try:
        find = driver.find_element
        bubbles = lambda kind: driver.find_elements(By.CSS_SELECTOR, f".message.{kind}")  # noqa: E731
        state = lambda bubble: bubble.get_attribute("data-state")  # noqa: E731
        driver.get(f"http://{server[0]}:{server[1]}/")
        assert driver.title == "nanochat"
        find(By.CSS_SELECTOR, "details summary").click()  # the sampling settings

        def set_field(name, value):
            field = find(By.ID, name)
            field.clear()
            field.send_keys(str(value))

        # a first question, answered in full
        set_field("max_tokens", 24)
        find(By.ID, "input").send_keys("Hello! Who are you?", Keys.ENTER)
        wait_for(lambda: bubbles("assistant") and state(bubbles("assistant")[0]) == "done", "the first answer")
        first_answer = bubbles("assistant")[0].text
        assert re.fullmatch(r"[a-z., ]+", first_answer) and len(first_answer.split()) >= 5

        # a long second answer, caught mid-stream: the screenshot, then Stop. Chromium's network throttling
        # slows the stream to ~2 KB/s (~80 tokens/s), so the answer is surely still streaming.
        set_field("max_tokens", 4000)
        find(By.CSS_SELECTOR, "details summary").click()  # fold the settings away for the picture
        throttle(driver, 2000)
        find(By.ID, "input").send_keys("Tell me a story about the river and the old house.", Keys.ENTER)
        wait_for(lambda: len(bubbles("assistant")) == 2 and len(bubbles("assistant")[1].text) > 200,
                 "a streaming answer")
        screenshot = tmp_path / "chat_web.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get("NANOCHAT_SCREENSHOT_DIR"):
            os.makedirs(os.environ["NANOCHAT_SCREENSHOT_DIR"], exist_ok=True)
            shutil.copy(screenshot, os.environ["NANOCHAT_SCREENSHOT_DIR"])
        assert screenshot.stat().st_size > 10_000
        assert state(bubbles("assistant")[1]) == "streaming"
        find(By.ID, "send").click()  # the Send button is Stop while an answer streams
        wait_for(lambda: state(bubbles("assistant")[1]) == "stopped", "the answer to stop")
        stopped_answer = bubbles("assistant")[1].text
        throttle(driver, None)
        assert [b.text for b in bubbles("user")] == ["Hello! Who are you?",
                                                     "Tell me a story about the river and the old house."]
        assert bubbles("assistant")[0].text == first_answer  # the conversation is kept

        # regenerate the last (stopped) answer: it is replaced, the first one stays
        find(By.CSS_SELECTOR, "details summary").click()
        set_field("max_tokens", 8)
        find(By.ID, "regenerate").click()
        wait_for(lambda: len(bubbles("assistant")) == 2 and state(bubbles("assistant")[1]) == "done", "the new answer")
        assert bubbles("assistant")[0].text == first_answer and bubbles("assistant")[1].text != stopped_answer
        assert len(bubbles("assistant")[1].text.split()) <= 8

        # a refused request shows the server's message and gives the question back
        set_field("temperature", 5)
        find(By.ID, "input").send_keys("Too hot?", Keys.ENTER)
        error = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".message.error"), "the error message")[0]
        assert "temperature must be a number between 0.0 and 2.0" in error.text
        assert find(By.ID, "input").get_attribute("value") == "Too hot?" and len(bubbles("user")) == 2

        # a new chat starts empty
        find(By.ID, "clear").click()
        assert not bubbles("user") and not bubbles("assistant")
    finally:
        driver.quit()


# -----------------------------------------------------------------------------
# Hostile clients (the probes of dev/probe_chat_web.py)

HOSTILE = [
    # (probe, status, words the message must hold)
    (probe.probe_declared_huge_body, 413, "the request body is 10737418240 bytes, the limit is 1048576"),
    (probe.probe_nested_json, 400, "nested too deeply"),
    (probe.probe_long_integer, 400, "5000 digits"),
    (probe.probe_lone_surrogate, 400, "surrogate"),
    (probe.probe_text_plain, 415, "application/json"),
    (probe.probe_foreign_host, 400, "rebind.example"),
]


@pytest.mark.parametrize("run_probe,status,message", HOSTILE, ids=[case[0].__name__ for case in HOSTILE])
def test_hostile_request_is_refused(server, run_probe, status, message):
    result = run_probe(server, timeout=60)
    assert result not in (None, "timeout"), result
    assert result[0] == status and message in json.loads(result[2])["detail"], result


def test_host_header_must_name_this_server(server):
    def status(path, host):
        result = probe.exchange(server, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), timeout=60)
        return result[0]

    port = server[1]
    for host in [f"localhost:{port}", f"[::1]:{port}", "LocalHost.", f"127.0.0.1:{port}", f"chat.example:{port}"]:
        assert status("/health", host) == 200, host
    for host in [f"rebind.example:{port}", "127.0.0.1.nip.io", "localhost.rebind.example", "chat.example.evil"]:
        assert status("/", host) == 400 and status("/health", host) == 400, host


def test_endless_body_is_cut_off_without_being_held(server_process):
    proc, server, _ = server_process
    before = get_json(server, "/stats")["rejected"]
    # 64 MiB offered in chunks, without a Content-Length: the server stops reading past 1 MiB and closes
    result, sent, rss_before, rss_peak = probe.probe_endless_body(server, 60, 64 << 20, pid=proc.pid)
    assert result is None or result[0] == 413, result  # the 413 may be lost to the reset of the connection
    assert sent < 32 << 20  # cut off: what was sent beyond 1 MiB sat in the sockets' buffers
    assert rss_peak - rss_before < 32 << 20  # and the server did not keep it (main's grew by ~2x the body)
    assert get_json(server, "/stats")["rejected"] == before + 1


def test_idle_and_slow_clients_are_cut_off(server):
    # three at once, so this waits CLIENT_TIMEOUT once; each probe gives up (None) after 60 s
    results = {}
    probes = {"idle": probe.probe_idle_connection, "slow headers": probe.probe_slow_headers,
              "slow body": probe.probe_slow_body}
    threads = [threading.Thread(target=lambda name=name, run=run: results.update({name: run(server, 60)}))
               for name, run in probes.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results["idle"] is not None and results["slow headers"] is not None, results  # closed by the server
    (status, _, body), _ = results["slow body"]
    assert status == 408 and f"did not arrive within {CLIENT_TIMEOUT} s (10 bytes came)" in json.loads(body)["detail"]
    assert len(chat(server, {"messages": QUESTION, "max_tokens": 3})) == 3  # and the server goes on answering


def test_connections_over_the_limit_get_503(server):
    result = probe.probe_many_connections(server, 60, MAX_CONNECTIONS)
    assert result not in (None, "timeout"), result
    status, headers, body = result
    assert status == 503 and headers["retry-after"] == "5" and "--max-connections" in json.loads(body)["detail"]
    # the idle connections closed, there is room again
    wait_for(lambda: get_json(server, "/health")["connections"] == 1, "the connections to close")


# -----------------------------------------------------------------------------
# The OpenAI-compatible API, through the official openai client


def openai_client(server, api_key=API_KEY):
    import openai
    return openai.OpenAI(base_url=f"http://{server[0]}:{server[1]}/v1", api_key=api_key, max_retries=0, timeout=120)


def streamed(client, **request):
    """(text, finish_reason, usage) of a streamed answer, from its chunks."""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []  # the usage chunk last
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    return text, chunks[-2].choices[0].finish_reason, chunks[-1].usage


def test_openai_client_streamed_and_not(key_server):
    client = openai_client(key_server)
    assert [m.id for m in client.models.list()] == ["nanochat-base-d1"]
    request = dict(model="nanochat-base-d1", messages=QUESTION, max_tokens=7, seed=1234, temperature=1.0)
    reply = client.chat.completions.create(**request)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "nanochat-base-d1" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason == "length"  # the word salad runs to max_tokens
    assert re.fullmatch(r"( [a-z]+|[.,])+", choice.message.content)
    assert reply.usage.completion_tokens == 7 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7
    # the same seed, streamed: the same answer, piece by piece; and from the page's endpoint
    text, finish_reason, usage = streamed(client, **request)
    assert (text, finish_reason) == (choice.message.content, "length") and usage == reply.usage
    body = {"messages": QUESTION, "max_tokens": 7, "seed": 1234, "temperature": 1.0}
    assert "".join(chat(key_server, body, {"Authorization": f"Bearer {API_KEY}"})) == text
    # a stop string: the answer ends before its first occurrence, finish_reason stop, streamed or not
    words = re.findall(r" [a-z]+|[.,]", text)
    stop = words[3] + words[4][:2]  # ends in the middle of a token: the stream holds it back until it knows
    expected = text[:text.index(stop)]
    reply = client.chat.completions.create(**{**request, "stop": [stop, "never there"]})
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    assert streamed(client, **{**request, "stop": stop})[:2] == (expected, "stop")
    # max_completion_tokens, OpenAI's newer name, wins over max_tokens
    reply = client.chat.completions.create(**{**request, "max_tokens": 30, "max_completion_tokens": 3})
    assert reply.usage.completion_tokens == 3 and reply.choices[0].message.content == "".join(words[:3])


def test_openai_client_bad_request_and_key(key_server):
    import openai
    client = openai_client(key_server)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="any", messages=QUESTION, temperature=2.5)
    assert refused.value.status_code == 400 and refused.value.param == "temperature"
    assert "temperature must be a number between 0.0 and 2.0, got 2.5" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="any", messages=QUESTION, top_p=0.5)
    assert refused.value.code == "unsupported_parameter" and "send top_k instead" in refused.value.message
    # the key: refused without it or with another one, on every generating endpoint
    with pytest.raises(openai.AuthenticationError) as refused:
        openai_client(key_server, api_key="not-the-key").chat.completions.create(model="any", messages=QUESTION)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai_client(key_server, api_key="not-the-key").models.list()
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": API_KEY}):
        conn, response = post(key_server, {"messages": QUESTION}, headers)
        detail = json.loads(response.read())["detail"]
        conn.close()
        assert response.status == 401 and "Authorization: Bearer KEY" in detail
        assert response.getheader("WWW-Authenticate") == "Bearer"
    assert get_json(key_server, "/health")["status"] == "ok"  # what does not generate wants no key


def test_openai_two_concurrent_clients(key_server):
    client = openai_client(key_server)
    before = get_json(key_server, "/stats")
    answers = {}

    def ask(name, stream):
        request = dict(model="any", messages=QUESTION, max_tokens=40, temperature=1.0)
        if stream:
            answers[name] = streamed(client, **request)
        else:
            reply = client.chat.completions.create(**request)
            answers[name] = (reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage)

    threads = [threading.Thread(target=ask, args=(name, name == "streamed")) for name in ("streamed", "whole")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for text, finish_reason, usage in answers.values():
        assert finish_reason == "length" and usage.completion_tokens == 40 and re.fullmatch(r"( [a-z]+|[.,])+", text)
    after = get_json(key_server, "/stats")
    assert after["requests"] - before["requests"] == 2 and after["tokens"] - before["tokens"] == 80


def test_page_asks_for_the_key_once_per_tab(key_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium_driver(tmp_path)
    try:
        find = driver.find_element
        answers = lambda: driver.find_elements(By.CSS_SELECTOR, ".message.assistant")  # noqa: E731
        driver.get(f"http://{key_server[0]}:{key_server[1]}/")
        key_form = find(By.ID, "key-form")
        assert not key_form.is_displayed()
        find(By.ID, "input").send_keys("Hello?", Keys.ENTER)
        # refused without the key: the page asks for it and gives the question back
        wait_for(key_form.is_displayed, "the key prompt")
        assert find(By.ID, "input").get_attribute("value") == "Hello?" and not answers()
        assert driver.switch_to.active_element == find(By.ID, "api-key")
        find(By.ID, "api-key").send_keys("not-the-key", Keys.ENTER)
        wait_for(lambda: "refused" in find(By.ID, "key-note").text, "the wrong key to be refused")
        assert key_form.is_displayed() and not answers()
        find(By.ID, "api-key").send_keys(API_KEY, Keys.ENTER)
        wait_for(lambda: answers() and answers()[0].get_attribute("data-state") == "done", "the answer")
        assert not key_form.is_displayed() and len(answers()[0].text.split()) >= 5
        assert driver.execute_script("return sessionStorage.getItem('nanochat-api-key')") == API_KEY
        # kept for the tab: after a reload the next question goes through without asking
        driver.refresh()
        find(By.ID, "input").send_keys("And again?", Keys.ENTER)
        wait_for(lambda: answers() and answers()[0].get_attribute("data-state") == "done", "the second answer")
        assert not find(By.ID, "key-form").is_displayed()
    finally:
        driver.quit()
