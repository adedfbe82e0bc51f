"""
Chat with a trained model in the browser, or from any OpenAI client: one FastAPI app, served by uvicorn.

    python -m scripts.chat_web                      # the SFT model at http://127.0.0.1:8000
    python -m scripts.chat_web -i mid --port 8080   # another model, another port
    NANOCHAT_API_KEY=secret python -m scripts.chat_web --host 0.0.0.0   # other machines, with a key

Endpoints:
    GET  /                     the chat page (nanochat/ui.html, one self-contained file)
    POST /chat/completions     {"messages": [{"role", "content"}, ...], "temperature", "top_k", "max_tokens"}
                               -> server-sent events: data: {"token": "..."} per piece of text, then
                                  data: {"done": true}
    POST /v1/chat/completions  OpenAI's chat completions (base URL http://localhost:8000/v1): a chat.completion
                               with usage, or with "stream": true chat.completion.chunk events, then data: [DONE]
    GET  /v1/models            the one model served
    GET  /health               is the server up, how many workers are free
    GET  /stats                requests and tokens served, per worker

Both chat endpoints take the same checked request to the same generation. Besides the fields above they take
OpenAI's: seed, stop, max_completion_tokens, content as a list of text parts and the developer role; top_p, n
and the penalties at their neutral values only (a 400 that says why otherwise); the model name is ignored.

Each GPU holds one replica of the model (a CPU or MPS machine holds one), in a pool: a request takes a
free replica or waits its turn, so concurrent users queue instead of colliding. Generation runs in a
thread, so the server keeps answering while a replica works, and notices a client that leaves: its
replica stops at the next token and goes back to the pool.

Every input is bounded. A request over a limit below gets a 400 that names the limit; a body over 1 MiB a
413, whether it says so in Content-Length or not (counted as it streams in, never held whole); a body that
is not application/json a 415 (a web page cannot send one without the browser asking this server first);
a Host header that is not this server's name a 400 (DNS rebinding: a page of another site that resolves
its name to 127.0.0.1). --max-connections open connections and --max-queue requests waiting for a replica
at most, then a 503 with Retry-After; a client has --client-timeout seconds to send a request's headers,
and again its body. With --api-key (or NANOCHAT_API_KEY) the generating endpoints want the header
Authorization: Bearer <key>, else 401; the page asks for the key once per tab.
"""

import argparse
import asyncio
import hmac
import json
import os
import random
import secrets
import socket
import threading
import time
import traceback
from contextlib import aclosing
from dataclasses import dataclass

import psutil
import torch
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

import nanochat
from nanochat.chat import ChatModel, assistant_content
from nanochat.common import autodetect_device_type, compute_init
from nanochat.decode import MODES as DECODE_MODES, session_mode
from nanochat.tokenizer import chat_messages

# Limits on one request: they bound the work and memory a single client can ask for.
MAX_BODY_BYTES = 1 << 20  # request body, counted as it arrives
MAX_NUMBER_DIGITS = 32  # digits of a number in the body (the largest taken, a seed, has 19)
MAX_MESSAGES = 500  # messages in a conversation
MAX_MESSAGE_CHARS = 8000  # characters in one message
MAX_CONVERSATION_CHARS = 32000  # characters in all messages together
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)
SEED_RANGE = (0, 2**63 - 1)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 200  # OpenAI's "stop": up to 4 strings
# OpenAI request fields this server cannot honour: taken at their neutral value, refused otherwise
NEUTRAL_FIELDS = {
    "top_p": (1, "sampling keeps the top_k most likely tokens: send top_k instead"),
    "n": (1, "one answer per request"),
    "presence_penalty": (0, "no penalties"),
    "frequency_penalty": (0, "no penalties"),
    "logit_bias": ({}, "no logit bias"),
    "logprobs": (False, "no log-probabilities"),
    "tools": ([], "the model's one tool is its calculator, which it calls by itself"),
    "response_format": ({"type": "text"}, "answers are plain text"),
}
RETRY_AFTER_SECONDS = 5  # what a 503 tells the client to wait
LOCAL_HOST_NAMES = {"localhost", "127.0.0.1", "::1"}
API_KEY_VARIABLE = "NANOCHAT_API_KEY"

parser = argparse.ArgumentParser(
    description="Serve a chat page, a streaming chat API and an OpenAI-compatible API for a trained nanochat model.",
    epilog="The server listens on 127.0.0.1 (this machine only) by default. To let other machines in, use "
           "--host 0.0.0.0 (every interface) or the address of one interface, and open the port in the firewall. "
           f"Without an API key (--api-key, or {API_KEY_VARIABLE} in the environment, which other users of the "
           "machine cannot read in the process list) anyone who can reach the port can use the model.")
parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                    help="training phase of the model (default sft)")
parser.add_argument("-g", "--model-tag", default=None, help="checkpoint folder, e.g. d20 (default: the largest model)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last one)")
parser.add_argument("-n", "--num-gpus", type=int, default=0,
                    help="GPUs to hold a replica each (default: all; CPU/MPS: one replica)")
parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature (default 0.8)")
parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (default 50)")
parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default longest answer in tokens (default 512)")
parser.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1; 0.0.0.0 = every interface)")
parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
parser.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE, ""),
                    help=f"key the generating endpoints want as 'Authorization: Bearer KEY' "
                         f"(default: ${API_KEY_VARIABLE}; none: no key needed)")
parser.add_argument("--allowed-hosts", default="",
                    help="more host names the server answers to, comma-separated ('*': any); it always answers "
                         "to localhost, 127.0.0.1, ::1 and the --host address, and with --host 0.0.0.0 to this "
                         "machine's name and addresses")
parser.add_argument("--max-connections", type=int, default=64,
                    help="open connections at most; the next one gets a 503 (default 64)")
parser.add_argument("--max-queue", type=int, default=32,
                    help="requests waiting for a free replica at most; the next one gets a 503 (default 32)")
parser.add_argument("--client-timeout", type=float, default=10.0,
                    help="seconds a client has to send a request's headers, and again its body (default 10)")
parser.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
parser.add_argument("-d", "--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="dtype to decode in; auto: bf16 where it was measured faster, or compiled on a CPU with bf16 units")
parser.add_argument("--decode-mode", default="", choices=["", *DECODE_MODES],
                    help="how each token is decoded (default: cuda_graph on CUDA; on CPU compiled while the server "
                         "starts, seconds once, then faster decoding: dev/bench_engine.py)")
args = parser.parse_args()
defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
for name, (low, high) in [("temperature", TEMPERATURE_RANGE), ("top_k", TOP_K_RANGE), ("max_tokens", MAX_TOKENS_RANGE)]:
    if not low <= defaults[name] <= high:
        parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
for name in ("max_connections", "max_queue", "client_timeout"):
    if getattr(args, name) <= 0:
        parser.error(f"--{name.replace('_', '-')} must be positive")
wildcard_host = args.host in ("0.0.0.0", "::", "")


def host_name(host_header):
    """The name in a Host header, lowercase, without port or brackets: '[::1]:8000' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")]
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).rstrip(".")


allowed_hosts = LOCAL_HOST_NAMES | {host_name(name) for name in args.allowed_hosts.split(",") if name.strip()}
if wildcard_host:  # the names and addresses other machines may use for this one
    allowed_hosts.add(socket.gethostname().lower())  # not getfqdn(): a DNS lookup that may hang without a network
    allowed_hosts |= {address.address.split("%")[0].lower() for addresses in psutil.net_if_addrs().values()
                      for address in addresses if address.family in (socket.AF_INET, socket.AF_INET6)}
else:
    allowed_hosts.add(host_name(args.host))

# -----------------------------------------------------------------------------
# The pool of model replicas


class ApiError(HTTPException):
    """A refused request: its status and a message that says what to do; OpenAI clients also get code and param."""

    def __init__(self, status, message, code=None, param=None, headers=None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code, self.param = code, param


@dataclass
class Worker:
    index: int
    chat: ChatModel
    busy: bool = False
    requests: int = 0  # answers started on this replica
    tokens: int = 0  # tokens it generated (only the thread working on this replica writes these counts)
    busy_seconds: float = 0.0  # time spent generating


class WorkerPool:
    """Replicas of the model; a request takes a free one (first come, first served) and gives it back."""

    def __init__(self, workers, max_waiting):
        self.workers = workers
        self.free = asyncio.Queue()
        for worker in workers:
            self.free.put_nowait(worker)
        self.waiting = 0  # requests waiting for a replica
        self.max_waiting = max_waiting

    async def acquire(self):
        if self.free.empty() and self.waiting >= self.max_waiting:
            raise ApiError(503, f"all {len(self.workers)} workers are busy and {self.waiting} requests are waiting "
                                f"(the limit, --max-queue): try again in a few seconds", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.waiting += 1
        try:
            worker = await self.free.get()
        finally:
            self.waiting -= 1
        worker.busy = True
        return worker

    def release(self, worker):
        worker.busy = False
        self.free.put_nowait(worker)


device_type = args.device_type or autodetect_device_type()
compute_init(device_type)
if device_type == "cuda":
    if args.num_gpus > torch.cuda.device_count():
        parser.error(f"--num-gpus={args.num_gpus} but only {torch.cuda.device_count()} GPUs are visible")
    devices = [torch.device("cuda", i) for i in range(args.num_gpus or torch.cuda.device_count())]
else:
    if args.num_gpus > 1:
        parser.error(f"--num-gpus={args.num_gpus} needs CUDA; on {device_type} the server holds one replica")
    devices = [torch.device(device_type)]
workers = []
for index, device in enumerate(devices):
    try:
        # requests choose their own sampling: compile for the defaults' and for greedy (OpenAI clients send 0 often)
        samplings = [(defaults["temperature"], defaults["top_k"]), (0.0, None)]
        workers.append(Worker(index, ChatModel(args.source, device, args.model_tag, args.step, args.dtype,
                                                  args.decode_mode or session_mode(device), samplings)))
    except FileNotFoundError as e:  # no checkpoint or tokenizer: the message says what to train
        raise SystemExit(str(e)) from None
    print(f"Worker {index}: {args.source} model {workers[-1].chat.describe()}", flush=True)
pool = WorkerPool(workers, args.max_queue)
tokenizer = workers[0].chat.tokenizer  # the same for every replica
context_len = workers[0].chat.context_len
model_id = f"nanochat-{args.source}-{args.model_tag or f'd{workers[0].chat.engine.model.config.n_layer}'}"
with open(os.path.join(os.path.dirname(nanochat.__file__), "ui.html"), encoding="utf-8") as f:
    page = f.read()
# unfinished: answers whose stream ended early (the client left, or generation failed)
served = {"requests": 0, "rejected": 0, "unfinished": 0}
started = time.time()
open_connections = set()  # the HTTP connections open now (GuardedH11Protocol)

# -----------------------------------------------------------------------------
# Checking a request


def bad_request(message, param=None, code=None):
    return ApiError(400, message, code=code, param=param)


def refuse_long_number(text):
    raise bad_request(f"a number in the body has {len(text)} digits, the limit is {MAX_NUMBER_DIGITS}")


def refuse_constant(name):
    raise bad_request(f"the request body is not valid JSON: {name} is not a JSON number")


async def read_json(request):
    """
    The parsed JSON body: Content-Type application/json, at most MAX_BODY_BYTES (refused on its Content-Length
    before any of it is read, or as soon as the count passes the limit while it streams in), sent within
    --client-timeout seconds. A refused body closes the connection, so its sender cannot go on sending it.
    """
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"the body must be JSON, sent with the header Content-Type: application/json "
                            f"(got {json.dumps(content_type or None)})", code="unsupported_media_type")
    close = {"Connection": "close"}
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {declared} bytes, the limit is {MAX_BODY_BYTES}", headers=close)
    body = bytearray()

    async def receive():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body passed the limit of {MAX_BODY_BYTES} bytes (reading "
                                    f"stopped at {len(body)})", headers=close)

    try:
        await asyncio.wait_for(receive(), args.client_timeout)
    except ClientDisconnect:  # nobody to answer: this ends the request without a traceback in the log
        raise ApiError(400, "the client left before its body was in") from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {args.client_timeout:g} s "
                            f"({len(body)} bytes came)", headers=close) from None
    try:
        return json.loads(body, parse_int=lambda text: int(text) if len(text) <= MAX_NUMBER_DIGITS
                          else refuse_long_number(text), parse_constant=refuse_constant)
    except RecursionError:
        raise bad_request("the request body is nested too deeply (arrays or objects inside one another)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise bad_request(f"the request body is not valid JSON: {e}") from None


def check_number(body, name, kind, value_range, default):
    """body[name] if given (null or absent means the default), checked against its range."""
    value = body.get(name)
    if value is None:
        return default
    low, high = value_range
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int)
    if wrong_type or not low <= value <= high:
        what = "a number" if kind is float else "an integer"
        raise bad_request(f"{name} must be {what} between {low} and {high}, got {json.dumps(value)}", param=name)
    return kind(value)


def message_text(content):
    """A message's content as one string: a string, or OpenAI's list of {"type": "text", "text"} parts; else None."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    return None


def check_request(body):
    """
    A parsed request body, ours or OpenAI's -> (messages ready to render, generation settings);
    ApiError(400) naming what is wrong if it is not one.
    """
    if not isinstance(body, dict):
        raise bad_request('the body must be a JSON object: {"messages": [...], ...}')
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request('"messages" must be a non-empty list of {"role", "content"} objects', param="messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"too many messages: {len(messages)}, the limit is {MAX_MESSAGES} per request",
                          param="messages")
    checked, total_chars = [], 0
    for i, message in enumerate(messages):
        content = message_text(message.get("content")) if isinstance(message, dict) else None
        if content is None:
            raise bad_request(f'message {i} must be an object with a "role" and a string "content" '
                              '(or a list of text parts)', param=f"messages[{i}]")
        role = "system" if message.get("role") == "developer" else message.get("role")  # OpenAI's newer name
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"message {i} has role {json.dumps(message.get('role'))}: "
                              "roles are system (first message only), user and assistant", param=f"messages[{i}]")
        if role != "assistant" and not content.strip():
            raise bad_request(f"message {i} ({role}) is empty", param=f"messages[{i}]")
        if len(content) > MAX_MESSAGE_CHARS:
            raise bad_request(f"message {i} is {len(content)} characters long, "
                              f"the limit is {MAX_MESSAGE_CHARS} per message", param=f"messages[{i}]")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no text the tokenizer can take
            raise bad_request(f"message {i} holds a lone UTF-16 surrogate, which is not text",
                              param=f"messages[{i}]") from None
        total_chars += len(content)
        # answers come back as streamed: tool calls between their token names -> parts with the tool tokens
        checked.append({"role": role, "content": assistant_content(content) if role == "assistant" else content})
    if total_chars > MAX_CONVERSATION_CHARS:
        raise bad_request(f"the conversation is {total_chars} characters long, "
                          f"the limit is {MAX_CONVERSATION_CHARS} in all", param="messages")
    if checked[-1]["role"] != "user":
        raise bad_request("the last message must be from the user: the answer is the assistant's next turn",
                          param="messages")
    try:
        chat_messages({"messages": checked})  # turn order: [system,] user, assistant, user, ...
    except ValueError as e:
        raise bad_request(str(e), param="messages") from None
    for name, (neutral, why) in NEUTRAL_FIELDS.items():
        if body.get(name) is not None and body[name] != neutral:
            raise bad_request(f"{name}={json.dumps(body[name])} is not supported ({why}): leave it out",
                              param=name, code="unsupported_parameter")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise bad_request(f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings of 1 to "
                          f"{MAX_STOP_CHARS} characters", param="stop")
    # OpenAI's newer name for max_tokens wins where both are given
    tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    settings = {
        "temperature": check_number(body, "temperature", float, TEMPERATURE_RANGE, defaults["temperature"]),
        "top_k": check_number(body, "top_k", int, TOP_K_RANGE, defaults["top_k"]),
        "max_tokens": check_number(body, tokens_name, int, MAX_TOKENS_RANGE, defaults["max_tokens"]),
        "seed": check_number(body, "seed", int, SEED_RANGE, None),  # None: a new one per answer
        "stop": stop,
    }
    return checked, settings


def check_host(request: Request):
    """A guard against DNS rebinding: a request must name this server in its Host header."""
    host = request.headers.get("host")
    if host is None or "*" in allowed_hosts or host_name(host) in allowed_hosts:
        return
    name = host_name(host)
    raise ApiError(400, f"this server does not answer to the host name {json.dumps(name)} (a guard against DNS "
                        f"rebinding): use localhost, or start it with --allowed-hosts={name}", code="invalid_host")


def check_api_key(request: Request):
    if not args.api_key:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), args.api_key.encode()):
        raise ApiError(401, "this server wants its API key: send the header 'Authorization: Bearer KEY' (the key "
                            f"chat_web was started with, --api-key or {API_KEY_VARIABLE})", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def error_response(path, status, message, code=None, param=None, headers=None):
    """A refusal as its endpoint's clients read it: OpenAI's error object under /v1/, {"detail"} elsewhere."""
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


# -----------------------------------------------------------------------------
# Generating an answer: the one path both chat endpoints take


class GenerationFailed(Exception):
    pass


class Answer:
    """One answer under way: the Engine generates in a thread on a replica; text() hands out the text as it comes."""

    def __init__(self, worker, prompt, settings):
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason = None  # "stop" or "length" once the answer is complete; None if it ended early
        self.stop_strings = settings["stop"]
        self.pieces = asyncio.Queue()  # text pieces from the thread; an Exception if it failed; None at the end
        self.halt = threading.Event()  # set when the answer ends early: the thread stops at its next token
        self.ended_by = None  # the thread's finish reason, written before it queues None
        seed = settings["seed"] if settings["seed"] is not None else random.randrange(2**31)
        engine_settings = {name: settings[name] for name in ("temperature", "top_k", "max_tokens")}
        loop = asyncio.get_running_loop()
        # the replica goes back to the pool when its thread ends, however the answer's reader ends (even cancelled)
        job = loop.run_in_executor(None, self.generate, loop, worker, prompt, engine_settings, seed)
        job.add_done_callback(lambda _: pool.release(worker))
        served["requests"] += 1

    def generate(self, loop, worker, prompt, settings, seed):
        """Runs in a thread, so the event loop stays free for other requests and for noticing disconnects."""
        t0, num_tokens = time.perf_counter(), 0
        try:
            pieces = worker.chat.answer(prompt, seed=seed, **settings)
            while not self.halt.is_set():
                try:
                    piece = next(pieces)
                except StopIteration as end:
                    self.ended_by = end.value
                    break
                num_tokens += 1
                loop.call_soon_threadsafe(self.pieces.put_nowait, piece)
        except Exception as e:
            traceback.print_exc()
            loop.call_soon_threadsafe(self.pieces.put_nowait, e)
        finally:  # the counts first, so /stats has them by the time the client reads the end of the answer
            seconds = time.perf_counter() - t0
            worker.requests += 1
            worker.tokens += num_tokens
            worker.busy_seconds += seconds
            loop.call_soon_threadsafe(self.pieces.put_nowait, None)
            outcome = "stopped early" if self.halt.is_set() else "done"
            print(f"worker {worker.index}: {len(prompt)} prompt tokens -> {num_tokens} tokens in {seconds:.2f}s "
                  f"({outcome})", flush=True)

    async def text(self, request):
        """
        The answer's text pieces, one per token as it comes, until the end, a stop string (the text before it),
        or the client leaving. Text that could begin a stop string waits until the next pieces tell.
        Raises GenerationFailed if the model failed.
        """
        held = ""  # the end of the text so far that may be the start of a stop string
        try:
            while (piece := await self.pieces.get()) is not None:
                if isinstance(piece, Exception):
                    raise GenerationFailed(f"generation failed: {piece}")
                self.completion_tokens += 1
                held += piece
                cut = min((i for i in (held.find(s) for s in self.stop_strings) if i >= 0), default=-1)
                if cut >= 0:
                    if held[:cut]:
                        yield held[:cut]
                    self.finish_reason = "stop"
                    return
                keep = max((n for s in self.stop_strings for n in range(1, len(s)) if held.endswith(s[:n])),
                           default=0)
                if len(held) > keep:
                    yield held[:len(held) - keep]
                    held = held[len(held) - keep:]
                if await request.is_disconnected():
                    return
            if held:
                yield held
            self.finish_reason = self.ended_by
        finally:  # also runs when the response is torn down because the client left
            self.halt.set()
            served["unfinished"] += self.finish_reason is None

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def start_answer(body):
    """A parsed request body -> its Answer under way on a replica (waiting for one first, 503 if the queue is full)."""
    messages, settings = check_request(body)
    prompt = tokenizer.render_for_completion({"messages": messages})
    if len(prompt) >= context_len:
        raise bad_request(f"the conversation is {len(prompt)} tokens, the model's context is {context_len}: "
                          "start a new conversation", param="messages", code="context_length_exceeded")
    worker = await pool.acquire()
    return Answer(worker, prompt, settings)


def event(data):
    return f"data: {json.dumps(data)}\n\n"


def event_stream(events):
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -----------------------------------------------------------------------------
# The app

app = FastAPI(title="nanochat", dependencies=[Depends(check_host)])
generating = [Depends(check_api_key)]


@app.exception_handler(StarletteHTTPException)
async def refused(request, error):
    served["rejected"] += 1
    return error_response(request.url.path, error.status_code, error.detail, getattr(error, "code", None),
                          getattr(error, "param", None), error.headers)


@app.get("/")
async def index():
    return HTMLResponse(page)


@app.post("/chat/completions", dependencies=generating)
async def chat_completions(request: Request):
    answer = await start_answer(await read_json(request))

    async def events():
        async with aclosing(answer.text(request)) as pieces:
            try:
                async for piece in pieces:
                    yield event({"token": piece})
            except GenerationFailed as e:
                yield event({"error": str(e)})
        if answer.finish_reason:
            yield event({"done": True})

    return event_stream(events())


@app.post("/v1/chat/completions", dependencies=generating)
async def openai_chat_completions(request: Request):
    body = await read_json(request)
    stream, options = (body.get("stream"), body.get("stream_options")) if isinstance(body, dict) else (None, None)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {json.dumps(stream)}", param="stream")
    if options is not None and not (isinstance(options, dict) and options.get("include_usage") in (None, True, False)):
        raise bad_request('stream_options must be {"include_usage": true or false}', param="stream_options")
    if isinstance(body, dict) and body.get("model") is not None and not isinstance(body["model"], str):
        raise bad_request("model must be a string (this server has one model, any name is taken)", param="model")
    answer = await start_answer(body)
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_id}

    if not stream:
        async with aclosing(answer.text(request)) as pieces:
            try:
                text = "".join([piece async for piece in pieces])
            except GenerationFailed as e:
                raise ApiError(500, str(e), code="generation_failed") from None
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": answer.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": answer.usage()}

    include_usage = bool(options and options.get("include_usage"))

    def chunk(delta, finish_reason=None):
        return event({**head, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **({"usage": None} if include_usage else {})})

    async def chunks():
        yield chunk({"role": "assistant", "content": ""})
        async with aclosing(answer.text(request)) as pieces:
            try:
                async for piece in pieces:
                    yield chunk({"content": piece})
            except GenerationFailed as e:
                yield event({"error": {"message": str(e), "type": "server_error", "param": None,
                                       "code": "generation_failed"}})
                return
        if answer.finish_reason:
            yield chunk({}, answer.finish_reason)
            if include_usage:
                yield event({**head, "object": "chat.completion.chunk", "choices": [], "usage": answer.usage()})
            yield "data: [DONE]\n\n"

    return event_stream(chunks())


@app.get("/v1/models", dependencies=generating)
async def openai_models():
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(started),
                                        "owned_by": "nanochat"}]}


@app.get("/health")
async def health():
    free = sum(not w.busy for w in pool.workers)
    return {"status": "ok", "workers": len(pool.workers), "free_workers": free, "waiting": pool.waiting,
            "connections": len(open_connections)}


@app.get("/stats")
async def stats():
    return {
        "source": args.source,
        "model": model_id,
        "uptime_seconds": round(time.time() - started, 1),
        **served,
        "tokens": sum(w.tokens for w in pool.workers),
        "waiting": pool.waiting,
        "workers": [{"index": w.index, "device": str(w.chat.device), "dtype": w.chat.dtype, "busy": w.busy,
                     "requests": w.requests, "tokens": w.tokens,
                     "tokens_per_second": round(w.tokens / w.busy_seconds, 1) if w.busy_seconds else None}
                    for w in pool.workers],
    }


# -----------------------------------------------------------------------------
# The connections


async def too_many_connections(scope, receive, send):
    """The ASGI app a connection over --max-connections gets instead of ours: a 503, then the connection closes."""
    response = error_response(scope["path"], 503, f"the server has {args.max_connections} connections open (the "
                              "limit, --max-connections): try again in a few seconds", code="too_many_connections",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"})
    await response(scope, receive, send)


class GuardedH11Protocol(H11Protocol):
    """
    uvicorn's HTTP/1.1 protocol with what it lacks: at most --max-connections open at once, and --client-timeout
    seconds to send each request's headers (uvicorn waits forever for a client that connects and sends nothing,
    or sends its headers a byte at a time).
    """

    def connection_made(self, transport):
        super().connection_made(transport)
        open_connections.add(self)
        if len(open_connections) > args.max_connections:
            self.app = too_many_connections
        self.headers_timer = None
        self.expect_headers()

    def expect_headers(self):
        """The next request's headers must be in within the timeout: a new request starts a new cycle."""
        cycle = self.cycle
        if self.headers_timer:
            self.headers_timer.cancel()
        self.headers_timer = self.loop.call_later(args.client_timeout, lambda: self.cycle is cycle
                                                  and self.transport.close())

    def on_response_complete(self):
        self.expect_headers()  # first: a pipelined request waiting behind this one starts in there
        super().on_response_complete()

    def connection_lost(self, exc):
        open_connections.discard(self)
        self.headers_timer.cancel()
        super().connection_lost(exc)


shown_host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::") else args.host
elsewhere = " (from other machines: this machine's address)" if wildcard_host else ""
print(f"Chat page: http://{shown_host}:{args.port}/{elsewhere}", flush=True)
print(f"OpenAI clients: base URL http://{shown_host}:{args.port}/v1, model {model_id}"
      f"{', with the API key' if args.api_key else ''}", flush=True)
if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
    print(f"Warning: listening on {args.host} without an API key: anyone who can reach port {args.port} can use "
          f"the model. Set {API_KEY_VARIABLE} (or --api-key) to require one.", flush=True)
uvicorn.run(app, host=args.host, port=args.port, http=GuardedH11Protocol, timeout_keep_alive=args.client_timeout)
