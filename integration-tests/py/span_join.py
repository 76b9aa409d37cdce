"""Independent OTLP sender for Vigil's span-join tests (integration-tests/tests/span_join.rs).

Uses only the official OpenTelemetry Python SDK and its OTLP/gRPC exporter
(PyPI, installed by `cargo xtask setup` into target/otel-python).

  server  An HTTP/1.1 server (keep-alive) whose listening socket lives in the
          network namespace --netns-path while the process, and so its OTLP
          exporter, stays in the caller's (where the agent's receiver listens).
          One SERVER span per request, with semantic-convention attributes.
          The oracle per span: TCP_INFO tcpi_total_retrans read at the span's
          start and again once every byte of the response is acknowledged
          (SIOCOUTQ == 0, so no retransmit of it can follow), each read
          --margin-ms inside the span. One JSON line per span to --results.
          On SIGTERM: stops, flushes the SDK, prints a JSON summary.
  client  Runs in the client namespace: --connections keep-alive connections,
          each doing --requests GETs of --bytes, then holding the connection
          --hold-ms so the agent samples it. Prints a JSON summary.
  burst   Ends --spans spans at once (no network) and flushes; prints every
          export's outcome and duration.

Every loop is bounded in count and time (--max-seconds).
"""

import argparse
import ctypes
import fcntl
import http.client
import json
import os
import signal
import socket
import struct
import sys
import termios
import threading
import time

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

CLONE_NEWNET = 0x40000000
# struct tcp_info (include/uapi/linux/tcp.h): 8 bytes of u8 fields, then u32s.
TCPI_RTT_OFFSET = 68
TCPI_TOTAL_RETRANS_OFFSET = 100
SERVICE_NAME = "vigil-span-join-test"


def log(*args):
    print("span_join.py:", *args, file=sys.stderr, flush=True)


def tcp_info(sock):
    """(tcpi_total_retrans, tcpi_rtt in microseconds)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    (total_retrans,) = struct.unpack_from("I", raw, TCPI_TOTAL_RETRANS_OFFSET)
    (rtt_us,) = struct.unpack_from("I", raw, TCPI_RTT_OFFSET)
    return total_retrans, rtt_us


def unacked_bytes(sock):
    """SIOCOUTQ: bytes written but not yet acknowledged by the peer."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return struct.unpack("i", raw)[0]


def listen_in_netns(netns_path, host, port):
    """A listening socket created inside another network namespace; the
    calling thread returns to its own before anything else runs."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into " + netns_path)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(128)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)
    return s


class CountingExporter(SpanExporter):
    """Wraps the OTLP exporter to record what the SDK exported and how long
    each export took."""

    def __init__(self, inner):
        self.inner = inner
        self.lock = threading.Lock()
        self.exported = 0
        self.failed = 0
        self.exports = []

    def export(self, spans):
        started = time.monotonic()
        result = self.inner.export(spans)
        took = time.monotonic() - started
        with self.lock:
            ok = result == SpanExportResult.SUCCESS
            if ok:
                self.exported += len(spans)
            else:
                self.failed += len(spans)
            self.exports.append({"spans": len(spans), "ok": ok, "seconds": took})
        return result

    def shutdown(self):
        self.inner.shutdown()

    def force_flush(self, timeout_millis=30000):
        return self.inner.force_flush(timeout_millis)

    def summary(self):
        with self.lock:
            return {
                "exported": self.exported,
                "export_failed": self.failed,
                "exports": list(self.exports),
            }


def tracer_provider(endpoint, batch_size):
    exporter = CountingExporter(OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10))
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=100_000,
            schedule_delay_millis=100,
            max_export_batch_size=batch_size,
        )
    )
    return provider, exporter


def read_request(f):
    """The request line and headers of one HTTP/1.1 request; None at EOF."""
    line = f.readline(8192)
    if not line:
        return None
    while True:
        header = f.readline(8192)
        if header in (b"\r\n", b"\n", b""):
            break
    return line.decode("latin-1").split()


def serve_connection(conn, peer, tracer, margin, results, results_lock, deadline):
    local = conn.getsockname()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = conn.makefile("rb")
    try:
        while time.monotonic() < deadline:
            request = read_request(f)
            if not request or len(request) < 2:
                return
            path = request[1]
            size = int(path.rsplit("/", 1)[-1]) if path.startswith("/bytes/") else 0
            attributes = {
                "http.request.method": request[0],
                "url.path": path,
                "url.scheme": "http",
                "network.protocol.version": "1.1",
                "network.transport": "tcp",
                "client.address": peer[0],
                "client.port": peer[1],
                "server.address": local[0],
                "server.port": local[1],
                "network.peer.address": peer[0],
                "network.peer.port": peer[1],
                "network.local.address": local[0],
                "network.local.port": local[1],
            }
            span = tracer.start_span("GET /bytes", kind=SpanKind.SERVER, attributes=attributes)
            # Nothing is unacknowledged now (the previous response was fully
            # acknowledged), so no retransmit can fall between the span's
            # start and this read.
            retrans_start, rtt_start = tcp_info(conn)
            time.sleep(margin)
            head = "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n" % size
            conn.sendall(head.encode("ascii") + b"v" * size)
            while unacked_bytes(conn) > 0:
                if time.monotonic() > deadline:
                    raise TimeoutError("response never acknowledged")
                time.sleep(0.001)
            time.sleep(margin)
            retrans_end, rtt_end = tcp_info(conn)
            span.set_attribute("http.response.status_code", 200)
            ctx = span.get_span_context()
            span.end()
            with results_lock:
                results.write(
                    json.dumps(
                        {
                            "trace_id": format_trace_id(ctx.trace_id),
                            "span_id": format_span_id(ctx.span_id),
                            "client_port": peer[1],
                            "bytes": size,
                            "retrans_delta": retrans_end - retrans_start,
                            "rtt_us_start": rtt_start,
                            "rtt_us_end": rtt_end,
                        }
                    )
                    + "\n"
                )
                results.flush()
    except (ConnectionError, TimeoutError, OSError) as e:
        log("connection", peer, "ended:", e)
    finally:
        f.close()
        conn.close()


def server(args):
    host, port = args.listen.rsplit(":", 1)
    listener = listen_in_netns(args.netns_path, host, int(port))
    provider, exporter = tracer_provider(args.otlp_endpoint, 512)
    tracer = provider.get_tracer("vigil.span_join_test")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = time.monotonic() + args.max_seconds
    results = open(args.results, "w", encoding="utf-8")
    results_lock = threading.Lock()
    margin = args.margin_ms / 1000.0
    listener.settimeout(0.1)
    print("listening on %s" % args.listen, flush=True)
    threads = []
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            conn, peer = listener.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        t = threading.Thread(
            target=serve_connection,
            args=(conn, peer, tracer, margin, results, results_lock, deadline),
            daemon=True,
        )
        t.start()
        threads.append(t)
    listener.close()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    results.close()
    provider.shutdown()
    print(json.dumps(exporter.summary()), flush=True)


def fetch(conn_no, args, out, lock):
    host, port = args.target.rsplit(":", 1)
    deadline = time.monotonic() + args.max_seconds
    done = 0
    c = http.client.HTTPConnection(host, int(port), timeout=args.max_seconds)
    try:
        for _ in range(args.requests):
            if time.monotonic() > deadline:
                break
            c.request("GET", "/bytes/%d" % args.bytes)
            body = c.getresponse().read()
            if len(body) != args.bytes:
                raise RuntimeError("short body: %d of %d" % (len(body), args.bytes))
            done += 1
        # Held open so the agent's socket sampler sees the connection after
        # its last span too.
        time.sleep(args.hold_ms / 1000.0)
    except Exception as e:  # reported in the summary; the test fails on it
        log("client connection", conn_no, "failed:", e)
    finally:
        c.close()
    with lock:
        out.append(done)


def client(args):
    lock = threading.Lock()
    done = []
    threads = [
        threading.Thread(target=fetch, args=(i, args, done, lock), daemon=True)
        for i in range(args.connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.max_seconds + 5)
    print(json.dumps({"requests": sum(done), "connections": len(done)}), flush=True)


def burst(args):
    provider, exporter = tracer_provider(args.otlp_endpoint, args.batch_size)
    tracer = provider.get_tracer("vigil.span_join_test")
    for i in range(args.spans):
        span = tracer.start_span(
            "burst",
            kind=SpanKind.SERVER,
            attributes={"client.address": "198.18.72.2", "client.port": 1000 + i},
        )
        span.end()
    flushed = provider.force_flush(int(args.max_seconds * 1000))
    provider.shutdown()
    summary = exporter.summary()
    summary["flushed"] = flushed
    print(json.dumps(summary), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--netns-path", required=True)
    s.add_argument("--listen", required=True)
    s.add_argument("--otlp-endpoint", required=True)
    s.add_argument("--results", required=True)
    s.add_argument("--margin-ms", type=float, default=20.0)
    s.add_argument("--max-seconds", type=float, default=120.0)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--connections", type=int, default=4)
    c.add_argument("--requests", type=int, default=6)
    c.add_argument("--bytes", type=int, default=512 * 1024)
    c.add_argument("--hold-ms", type=float, default=500.0)
    c.add_argument("--max-seconds", type=float, default=60.0)
    b = sub.add_parser("burst")
    b.add_argument("--otlp-endpoint", required=True)
    b.add_argument("--spans", type=int, default=200)
    b.add_argument("--batch-size", type=int, default=20)
    b.add_argument("--max-seconds", type=float, default=60.0)
    args = p.parse_args()
    {"server": server, "client": client, "burst": burst}[args.mode](args)


if __name__ == "__main__":
    main()
