"""
Probe a running chat_web server as a hostile client would, and print what each probe got (a table), with the
server's memory (RSS) while it is sent an endless chunked body. tests/test_chat_web.py runs the same probes.

    python -m scripts.chat_web -i sft --port 8000 &
    python -m dev.probe_chat_web --port 8000 --pid $!

--pid: the server's process id, to sample its memory (psutil); --body-mib: how much of the endless body to
send at most; --timeout: how long a probe waits for the server before it says "no answer". Point it at
another checkout's chat_web (e.g. main's) to compare; every probe is bounded by --timeout.
"""

import argparse
import http.client
import json
import socket
import threading
import time

import psutil

CHAT = "/chat/completions"
QUESTION = {"messages": [{"role": "user", "content": "Tell me about the river."}], "max_tokens": 1}


def head(path=CHAT, host="localhost", content_type="application/json", length=None, chunked=False):
    """The bytes of a POST request's head."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Type: {content_type}"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock):
    """(status, headers, body) of the response on sock, or None when the server closed without one."""
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        return None
    finally:
        response.close()


def exchange(address, data, timeout):
    """Send data on a new connection; (status, headers, body), None if closed without a response, 'timeout'."""
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(data)
            return read_response(sock)
        except (socket.timeout, TimeoutError):
            return "timeout"
        except (ConnectionResetError, BrokenPipeError):
            return None


def post_json(address, body_bytes, timeout, **head_args):
    return exchange(address, head(length=len(body_bytes), **head_args) + body_bytes, timeout)


def outcome(result, seconds=None, timeout=None):
    """A probe's result in a few words: the status (and Retry-After), 'closed', or 'no answer in N s'."""
    if result == "timeout":
        return f"no answer in {timeout:g} s"
    if result is None:
        return "closed" + (f" after {seconds:.1f} s" if seconds is not None else "")
    status, headers, _ = result
    text = str(status) + (f" Retry-After {headers['retry-after']}" if "retry-after" in headers else "")
    return text + (f" after {seconds:.1f} s" if seconds is not None else "")


# -----------------------------------------------------------------------------
# The probes: each takes the server's (host, port) and a timeout, and returns its result


def probe_declared_huge_body(address, timeout):
    """Content-Length of 10 GiB, then 64 KiB of it: refused on the header, before the body is read?"""
    return exchange(address, head(length=10 << 30) + b" " * (64 << 10), timeout)


def probe_nested_json(address, timeout):
    return post_json(address, b"[" * 100_000, timeout)


def probe_long_integer(address, timeout):
    body = json.dumps(QUESTION)[:-1] + ', "seed": ' + "9" * 5000 + "}"
    return post_json(address, body.encode(), timeout)


def probe_lone_surrogate(address, timeout):
    body = json.dumps({**QUESTION, "messages": [{"role": "user", "content": "\ud800"}]})  # ascii: "\\ud800"
    return post_json(address, body.encode(), timeout)


def probe_text_plain(address, timeout):
    """A cross-site form or fetch may POST text/plain without asking the server first (no CORS preflight)."""
    return post_json(address, json.dumps(QUESTION).encode(), timeout, content_type="text/plain")


def probe_foreign_host(address, timeout):
    """DNS rebinding: a page of rebind.example, whose name now resolves to 127.0.0.1, reads the answer."""
    return post_json(address, json.dumps(QUESTION).encode(), timeout, host=f"rebind.example:{address[1]}")


def wait_for_close(sock, timeout, drip=None):
    """Seconds until the server closes sock (sending drip, if given, one byte every 0.5 s), or None after timeout."""
    t0 = time.time()
    sock.settimeout(0.5)
    while time.time() - t0 < timeout:
        try:
            if sock.recv(65536) == b"":
                return time.time() - t0
        except (socket.timeout, TimeoutError):
            if drip:
                try:
                    sock.sendall(drip)
                except (BrokenPipeError, ConnectionResetError):
                    return time.time() - t0
        except ConnectionResetError:
            return time.time() - t0
    return None


def probe_idle_connection(address, timeout):
    """Connect and send nothing: seconds until the server closes the connection (None: still open)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        return wait_for_close(sock, timeout)


def probe_slow_headers(address, timeout):
    """Headers a byte every 0.5 s, never finished: seconds until the server closes the connection."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        return wait_for_close(sock, timeout, drip=b"X")


def probe_slow_body(address, timeout):
    """A body of 1000 bytes announced, 10 sent, then nothing: (result, seconds)."""
    t0 = time.time()
    return exchange(address, head(length=1000) + b'{"messages', timeout), time.time() - t0


def probe_many_connections(address, timeout, count):
    """count idle connections, then a request on one more: its result."""
    idle = [socket.create_connection(address, timeout=timeout) for _ in range(count)]
    try:
        return exchange(address, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", timeout)
    finally:
        for sock in idle:
            sock.close()


def probe_full_queue(address, timeout, count):
    """count long answers asked for at once: {status: how many}, and the Retry-After values of the 503s."""
    body = json.dumps({**QUESTION, "max_tokens": 4096}).encode()
    socks = [socket.create_connection(address, timeout=timeout) for _ in range(count)]
    statuses, retry_after = {}, set()
    try:
        for sock in socks:
            sock.sendall(head(length=len(body)) + body)
        for sock in socks:
            sock.settimeout(min(timeout, 3.0))  # a request waiting for a worker gets its head when it has one
            response = http.client.HTTPResponse(sock)
            try:
                response.begin()  # the head only: the 200s stream on
                status = response.status
                if response.getheader("retry-after"):
                    retry_after.add(response.getheader("retry-after"))
            except (socket.timeout, TimeoutError):
                status = "waiting"
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        for sock in socks:
            sock.close()
    return statuses, retry_after


def probe_endless_body(address, timeout, max_bytes, pid=None):
    """
    A chunked body (no Content-Length), 64 KiB chunks until the server cuts it off or max_bytes are sent
    (then the end of the body). Returns (result, bytes sent, server RSS before, server peak RSS) (RSS: None
    without pid).
    """
    process = psutil.Process(pid) if pid else None
    rss_before = process.memory_info().rss if process else None
    peak = [rss_before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    if process:
        sampler.start()
    chunk = b"%x\r\n" % (64 << 10) + b" " * (64 << 10) + b"\r\n"
    sent = 0
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            try:
                sock.sendall(head(chunked=True))
                while sent < max_bytes:
                    sock.sendall(chunk)
                    sent += 64 << 10
                sock.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # cut off: the server may still have sent its answer
            except (socket.timeout, TimeoutError):
                return "timeout", sent, rss_before, peak[0]
            try:
                result = read_response(sock)
            except (socket.timeout, TimeoutError):
                result = "timeout"
            time.sleep(0.2)  # a last sample, after the server answered
    finally:
        done.set()
        if process:
            sampler.join()
    return result, sent, rss_before, peak[0]


def main():
    parser = argparse.ArgumentParser(description="Probe a running chat_web server as a hostile client would.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--pid", type=int, default=None, help="the server's process id: sample its memory")
    parser.add_argument("--body-mib", type=int, default=512, help="most of the endless body to send (MiB)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a probe waits for the server")
    parser.add_argument("--connections", type=int, default=80, help="idle connections before one more request")
    parser.add_argument("--queue", type=int, default=40, help="long answers asked for at once")
    args = parser.parse_args()
    address, timeout = (args.host, args.port), args.timeout
    rows = []

    def row(name, text):
        rows.append((name, text))
        print(f"{name:<44} {text}", flush=True)

    result, sent, rss_before, rss_peak = probe_endless_body(address, timeout, args.body_mib << 20, args.pid)
    memory = (f"; server RSS {rss_before / 2**20:.0f} MiB before, {rss_peak / 2**20:.0f} MiB at its peak"
              if args.pid else "")
    row(f"endless chunked body (up to {args.body_mib} MiB)", f"{outcome(result, timeout=timeout)} after "
        f"{sent / 2**20:.1f} MiB sent{memory}")
    t0 = time.time()
    row("Content-Length 10 GiB, 64 KiB sent", outcome(probe_declared_huge_body(address, timeout), time.time() - t0,
                                                       timeout))
    row("JSON nested 100,000 deep", outcome(probe_nested_json(address, timeout), timeout=timeout))
    row("integer of 5,000 digits", outcome(probe_long_integer(address, timeout), timeout=timeout))
    row("lone surrogate in a message", outcome(probe_lone_surrogate(address, timeout), timeout=timeout))
    row("Content-Type text/plain", outcome(probe_text_plain(address, timeout), timeout=timeout))
    row("Host: rebind.example (DNS rebinding)", outcome(probe_foreign_host(address, timeout), timeout=timeout))
    seconds = probe_idle_connection(address, timeout)
    row("idle connection", f"closed after {seconds:.1f} s" if seconds else f"open after {timeout:g} s")
    seconds = probe_slow_headers(address, timeout)
    row("headers a byte every 0.5 s", f"closed after {seconds:.1f} s" if seconds else f"open after {timeout:g} s")
    result, seconds = probe_slow_body(address, timeout)
    row("body: 10 of 1000 bytes, then nothing", outcome(result, seconds if result != "timeout" else None, timeout))
    row(f"request after {args.connections} idle connections",
        outcome(probe_many_connections(address, timeout, args.connections), timeout=timeout))
    statuses, retry_after = probe_full_queue(address, timeout, args.queue)
    row(f"{args.queue} long answers at once", ", ".join(f"{n} x {status}" for status, n in statuses.items())
        + (f" (Retry-After {', '.join(sorted(retry_after))})" if retry_after else ""))
    print("\n| probe | outcome |\n| --- | --- |")
    for name, text in rows:
        print(f"| {name} | {text} |")


if __name__ == "__main__":
    main()
