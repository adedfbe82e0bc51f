"""
Chat with a trained model in the browser: one FastAPI app, served by uvicorn, with the page and its API.

    python -m scripts.chat_web                      # the SFT model at http://127.0.0.1:8000
    python -m scripts.chat_web -i mid --port 8080   # another model, another port
    python -m scripts.chat_web --host 0.0.0.0       # reachable from other machines (there is no login)

Endpoints:
    GET  /                  the chat page (nanochat/ui.html, one self-contained file)
    POST /chat/completions  {"messages": [{"role", "content"}, ...], "temperature", "top_k", "max_tokens"}
                            -> server-sent events: data: {"token": "..."} per piece of text, then data: {"done": true}
    GET  /health            is the server up, how many workers are free
    GET  /stats             requests and tokens served, per worker

Each GPU holds one replica of the model (a CPU or MPS machine holds one), in a pool: a request takes a
free replica or waits its turn, so concurrent users queue instead of colliding. Generation runs in a
thread, so the server keeps answering while a replica works, and notices a client that leaves: its
replica stops at the next token and goes back to the pool. Requests over the limits below get a 400
that names the limit.
"""

import argparse
import asyncio
import json
import os
import random
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse

import nanochat
from nanochat.chat import ChatModel, assistant_content
from nanochat.common import autodetect_device_type, compute_init
from nanochat.decode import MODES as DECODE_MODES
from nanochat.tokenizer import chat_messages

# Limits on one request: they bound the work and memory a single client can ask for.
MAX_BODY_BYTES = 1 << 20  # request body, before parsing
MAX_MESSAGES = 500  # messages in a conversation
MAX_MESSAGE_CHARS = 8000  # characters in one message
MAX_CONVERSATION_CHARS = 32000  # characters in all messages together
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)

parser = argparse.ArgumentParser(
    description="Serve a chat page and a streaming chat API for a trained nanochat model.",
    epilog="The server listens on 127.0.0.1 (this machine only) by default. To let other machines in, "
           "use --host 0.0.0.0 (every interface) or the address of one interface, and open the port in "
           "the firewall; anyone who can reach it can use the model, there is no login.")
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
parser.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
parser.add_argument("-d", "--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="dtype to decode in; auto: bf16 where it was measured faster")
parser.add_argument("--decode-mode", default="", choices=["", *DECODE_MODES],
                    help="how each token is decoded (default: cuda_graph on CUDA, eager elsewhere); on CPU, compile "
                         "takes seconds once, then decodes faster (dev/bench_engine.py)")
args = parser.parse_args()
defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
for name, (low, high) in [("temperature", TEMPERATURE_RANGE), ("top_k", TOP_K_RANGE), ("max_tokens", MAX_TOKENS_RANGE)]:
    if not low <= defaults[name] <= high:
        parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")

# -----------------------------------------------------------------------------
# The pool of model replicas


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

    def __init__(self, workers):
        self.workers = workers
        self.free = asyncio.Queue()
        for worker in workers:
            self.free.put_nowait(worker)
        self.waiting = 0  # requests waiting for a replica

    async def acquire(self):
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
        workers.append(Worker(index, ChatModel(args.source, device, args.model_tag, args.step, args.dtype,
                                                  args.decode_mode)))
    except FileNotFoundError as e:  # no checkpoint or tokenizer: the message says what to train
        raise SystemExit(str(e)) from None
    print(f"Worker {index}: {args.source} model {workers[-1].chat.describe()}", flush=True)
pool = WorkerPool(workers)
tokenizer = workers[0].chat.tokenizer  # the same for every replica
context_len = workers[0].chat.context_len
with open(os.path.join(os.path.dirname(nanochat.__file__), "ui.html"), encoding="utf-8") as f:
    page = f.read()
# unfinished: answers whose stream ended early (the client left, or generation failed)
served = {"requests": 0, "rejected": 0, "unfinished": 0}
started = time.time()

# -----------------------------------------------------------------------------
# Checking a request


def bad_request(message):
    served["rejected"] += 1
    return HTTPException(status_code=400, detail=message)


def check_number(body, name, kind, value_range):
    """body[name] if given (null or absent means the server default), checked against its range."""
    value = body.get(name)
    if value is None:
        return defaults[name]
    low, high = value_range
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int)
    if wrong_type or not low <= value <= high:
        what = "a number" if kind is float else "an integer"
        raise bad_request(f"{name} must be {what} between {low} and {high}, got {json.dumps(value)}")
    return kind(value)


def check_request(body):
    """A parsed request body -> (messages ready to render, generation settings); HTTPException(400) if not."""
    if not isinstance(body, dict):
        raise bad_request('the body must be a JSON object: {"messages": [...], ...}')
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request('"messages" must be a non-empty list of {"role", "content"} objects')
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"too many messages: {len(messages)}, the limit is {MAX_MESSAGES} per request")
    total_chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise bad_request(f'message {i} must be an object with a "role" and a string "content"')
        if message.get("role") not in ("system", "user", "assistant"):
            raise bad_request(f"message {i} has role {json.dumps(message.get('role'))}: "
                              "roles are system (first message only), user and assistant")
        if message["role"] != "assistant" and not message["content"].strip():
            raise bad_request(f"message {i} ({message['role']}) is empty")
        if len(message["content"]) > MAX_MESSAGE_CHARS:
            raise bad_request(f"message {i} is {len(message['content'])} characters long, "
                              f"the limit is {MAX_MESSAGE_CHARS} per message")
        total_chars += len(message["content"])
    if total_chars > MAX_CONVERSATION_CHARS:
        raise bad_request(f"the conversation is {total_chars} characters long, "
                          f"the limit is {MAX_CONVERSATION_CHARS} in all")
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must be from the user: the answer is the assistant's next turn")
    # answers come back as streamed: tool calls between their token names -> parts with the tool tokens
    messages = [{**m, "content": assistant_content(m["content"])} if m["role"] == "assistant" else m for m in messages]
    try:
        chat_messages({"messages": messages})  # turn order: [system,] user, assistant, user, ...
    except ValueError as e:
        raise bad_request(str(e)) from None
    settings = {
        "temperature": check_number(body, "temperature", float, TEMPERATURE_RANGE),
        "top_k": check_number(body, "top_k", int, TOP_K_RANGE),
        "max_tokens": check_number(body, "max_tokens", int, MAX_TOKENS_RANGE),
    }
    return messages, settings


# -----------------------------------------------------------------------------
# Streaming an answer


def event(data):
    return f"data: {json.dumps(data)}\n\n"


async def stream_answer(request, prompt, settings):
    """Server-sent events of one answer: wait for a replica, generate in a thread, stop if the client leaves."""
    worker = await pool.acquire()
    loop = asyncio.get_running_loop()
    pieces = asyncio.Queue()  # text pieces from the generating thread; an Exception if it failed; None at the end
    stop = threading.Event()  # set when the stream ends early: the thread stops at its next token
    seed = random.randrange(2**31)

    def generate():  # runs in a thread, so the event loop stays free for other requests and for noticing disconnects
        t0, num_tokens = time.perf_counter(), 0
        try:
            for piece in worker.chat.answer(prompt, seed=seed, **settings):
                num_tokens += 1
                loop.call_soon_threadsafe(pieces.put_nowait, piece)
                if stop.is_set():
                    break
        except Exception as e:
            traceback.print_exc()
            loop.call_soon_threadsafe(pieces.put_nowait, e)
        finally:  # the counts first, so /stats has them by the time the client reads the end of the stream
            seconds = time.perf_counter() - t0
            worker.requests += 1
            worker.tokens += num_tokens
            worker.busy_seconds += seconds
            loop.call_soon_threadsafe(pieces.put_nowait, None)
            outcome = "stopped early" if stop.is_set() else "done"
            print(f"worker {worker.index}: {len(prompt)} prompt tokens -> {num_tokens} tokens in {seconds:.2f}s "
                  f"({outcome})", flush=True)

    # the replica goes back to the pool when its thread ends, however this generator ends (even if cancelled)
    job = loop.run_in_executor(None, generate)
    job.add_done_callback(lambda _: pool.release(worker))
    served["requests"] += 1
    finished = False
    try:
        while (piece := await pieces.get()) is not None:
            if isinstance(piece, Exception):
                yield event({"error": f"generation failed: {piece}"})
                break
            if piece:
                yield event({"token": piece})
            if await request.is_disconnected():
                break
        else:
            yield event({"done": True})
            finished = True
    finally:  # also runs when the response is torn down because the client left
        stop.set()
        served["unfinished"] += not finished


# -----------------------------------------------------------------------------
# The app

app = FastAPI(title="nanochat")


@app.get("/")
async def index():
    return HTMLResponse(page)


@app.post("/chat/completions")
async def chat_completions(request: Request):
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        served["rejected"] += 1
        raise HTTPException(status_code=413,
                            detail=f"the request body is {len(body)} bytes, the limit is {MAX_BODY_BYTES}")
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    messages, settings = check_request(parsed)
    prompt = tokenizer.render_for_completion({"messages": messages})
    if len(prompt) >= context_len:
        raise bad_request(f"the conversation is {len(prompt)} tokens, the model's context is {context_len}: "
                          "start a new conversation")
    return StreamingResponse(stream_answer(request, prompt, settings), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@app.get("/health")
async def health():
    free = sum(not w.busy for w in pool.workers)
    return {"status": "ok", "workers": len(pool.workers), "free_workers": free, "waiting": pool.waiting}


@app.get("/stats")
async def stats():
    return {
        "source": args.source,
        "uptime_seconds": round(time.time() - started, 1),
        **served,
        "tokens": sum(w.tokens for w in pool.workers),
        "waiting": pool.waiting,
        "workers": [{"index": w.index, "device": str(w.chat.device), "dtype": w.chat.dtype, "busy": w.busy,
                     "requests": w.requests, "tokens": w.tokens,
                     "tokens_per_second": round(w.tokens / w.busy_seconds, 1) if w.busy_seconds else None}
                    for w in pool.workers],
    }


shown_host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::") else args.host
elsewhere = " (from other machines: this machine's address)" if args.host in ("0.0.0.0", "::") else ""
print(f"Chat page: http://{shown_host}:{args.port}/{elsewhere}", flush=True)
uvicorn.run(app, host=args.host, port=args.port)
