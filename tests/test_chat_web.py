"""
scripts/chat_web.py as users meet it: a real uvicorn server on 127.0.0.1 serving the tiny base model of
chat_base_dir (every answer is a word salad that runs to max_tokens), talked to over HTTP and from the page
in a real headless Chromium.
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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = [{"role": "user", "content": "Tell me about the river."}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base_dir, source, log_path):
    """A chat_web process serving `source` on a free port; returns (process, (host, port)) once it answers."""
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", source, "-d", "float32",
                                 "--device-type", "cpu", "--port", str(port)],
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


@pytest.fixture(scope="module")
def server(chat_base_dir, tmp_path_factory):
    """(host, port) of a chat_web server of the word-salad base model, for the whole module."""
    proc, address = start_server(chat_base_dir, "base", tmp_path_factory.mktemp("chat_web") / "server.log")
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


def post(server, body):
    """Send a chat request; returns (connection, response) with the body unread."""
    conn = http.client.HTTPConnection(*server, timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/chat/completions", body=data, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def events(response):
    """The server-sent events of a streaming response, parsed, as they arrive."""
    while line := response.readline():
        line = line.decode("utf-8").rstrip("\n")
        if line:
            assert line.startswith("data: "), line
            yield json.loads(line[len("data: "):])


def chat(server, body):
    """Token texts of a whole streamed answer; asserts it ends with done."""
    conn, response = post(server, body)
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
    proc, sft_server = start_server(chat_base_dir, "sft", tmp_path / "server.log")
    try:
        expected = "<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>"
        answer = "".join(chat(sft_server, {"messages": QUESTION, "temperature": 0.0}))
        assert answer == expected
        # the answer, sent back as streamed, is taken (test_chat checks it renders back to the same tokens)
        follow_up = QUESTION + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Again?"}]
        assert "".join(chat(sft_server, {"messages": follow_up, "temperature": 0.0})) == expected
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
]


@pytest.mark.parametrize("what,body,status,message", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_refused_with_the_limit(server, what, body, status, message):
    conn, response = post(server, body)
    detail = json.loads(response.read())["detail"]
    conn.close()
    assert response.status == status and message in detail, (response.status, detail)


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
