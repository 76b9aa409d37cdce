#!/usr/bin/env python3
"""A Python client of Vigil's control API, built from the proto alone.

The proof that a service team in another language (Go, mostly) can
implement the contract from proto/vigil/control/v1/control.proto: the stubs
are generated at start with grpcio-tools, nothing else of Vigil is used.
Driven by integration-tests/tests/control_api.rs; every scenario prints one
JSON object per line on stdout.

    control_client.py --socket S --proto-root DIR SCENARIO [ARG]

Scenarios:
  register       register, report 3 periods of slow upstream fetches, and
                 print the first pool target that grows the pool
  intrude ID     try to watch and report to registration ID (someone else's)
  malformed      send out-of-range and malformed requests, print each status
  flood N        register, open N target watches, print how many were refused,
                 then hold them without reading until killed
"""

import argparse
import importlib
import json
import sys
import tempfile
import threading
import time


def stubs(proto_root):
    """Generates and imports the control API's Python modules."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="vigil-control-py-")
    rc = protoc.main([
        "protoc",
        f"-I{proto_root}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"{proto_root}/vigil/control/v1/control.proto",
    ])
    if rc != 0:
        sys.exit(f"protoc failed: {rc}")
    sys.path.insert(0, out)
    pb = importlib.import_module("vigil.control.v1.control_pb2")
    rpc = importlib.import_module("vigil.control.v1.control_pb2_grpc")
    return pb, rpc


def dial(socket, own_connection=False):
    """A channel to the agent's socket. The authority must be a valid host
    name: gRPC's default for unix: targets (the percent-encoded path) is
    refused by the agent's HTTP/2 server. With own_connection, the channel
    does not share a connection with the process's other channels (the
    agent allows 8 streams per connection; more would queue, not fail)."""
    import grpc

    options = [("grpc.default_authority", "localhost")]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.insecure_channel(f"unix:{socket}", options=options)


def say(**kv):
    print(json.dumps(kv), flush=True)


def code_of(call):
    import grpc

    try:
        call()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def request(pb, **over):
    pool = pb.Pool(
        name="upstream",
        upstream="198.18.9.9:8080",
        max_idle=4,
        max_open=8,
        idle_bounds=pb.Bounds(min=2, max=64),
        open_bounds=pb.Bounds(min=4, max=128),
    )
    req = pb.RegisterRequest(pools=[pool], serving_port=8080)
    for k, v in over.items():
        setattr(req, k, v)
    return req


def slow_fetches(pb, registration, periods, period_s):
    for _ in range(periods):
        yield pb.LoadReport(
            registration=registration,
            pools=[pb.PoolLoad(pool="upstream", in_use=4, requests=100,
                               hold_mean_ms=250.0, wait_mean_ms=40.0, wait_p99_ms=90.0)],
            in_flight=4,
            latency_p50_ms=260.0,
            latency_p99_ms=400.0,
            requests=100,
        )
        time.sleep(period_s)


def register(pb, stub):
    resp = stub.Register(request(pb))
    say(registration=resp.registration, workload=resp.workload,
        mode=pb.Mode.Name(resp.mode), control_period_ms=resp.control_period_ms)
    period = resp.control_period_ms / 1000.0
    summary = {}
    reporter = threading.Thread(
        target=lambda: summary.update(
            reports=stub.ReportLoad(slow_fetches(pb, resp.registration, 3, period)).reports))
    reporter.start()
    found = None
    for t in stub.WatchTargets(pb.WatchTargetsRequest(registration=resp.registration), timeout=15):
        grown = [p for p in t.pools if p.max_idle > 4]
        if grown:
            found = {"generation": t.generation, "mode": pb.Mode.Name(t.mode),
                     "max_idle": grown[0].max_idle, "max_open": grown[0].max_open,
                     "reason": grown[0].reason}
            break
    reporter.join()
    say(target=found, reports=summary.get("reports"))


def intrude(pb, stub, registration):
    watch = code_of(lambda: next(iter(stub.WatchTargets(
        pb.WatchTargetsRequest(registration=registration), timeout=5))))
    report = code_of(lambda: stub.ReportLoad(
        iter([pb.LoadReport(registration=registration)]), timeout=5))
    say(watch=watch, report=report)


def malformed(pb, stub):
    codes = {}
    bad = request(pb)
    bad.pools[0].idle_bounds.min = 10
    bad.pools[0].idle_bounds.max = 3
    codes["min_above_max"] = code_of(lambda: stub.Register(bad))
    # What a Go client sends for uint32(-1): the largest value.
    huge = request(pb)
    huge.pools[0].idle_bounds.max = 2**32 - 1
    codes["negative_size"] = code_of(lambda: stub.Register(huge))
    twice = request(pb)
    twice.pools.append(twice.pools[0])
    codes["pool_twice"] = code_of(lambda: stub.Register(twice))
    big = request(pb)
    big.pools[0].upstream = "x" * (100 * 1024)
    codes["oversized"] = code_of(lambda: stub.Register(big))
    codes["no_registration"] = code_of(lambda: next(iter(stub.WatchTargets(
        pb.WatchTargetsRequest(registration="0" * 32), timeout=5))))
    reg = stub.Register(request(pb)).registration
    codes["unknown_pool_report"] = code_of(lambda: stub.ReportLoad(iter([pb.LoadReport(
        registration=reg, pools=[pb.PoolLoad(pool="nope")])]), timeout=5))
    codes["nan_report"] = code_of(lambda: stub.ReportLoad(iter([pb.LoadReport(
        registration=reg, latency_p99_ms=float("nan"))]), timeout=5))
    codes["good_after_bad"] = code_of(lambda: stub.ReportLoad(iter([pb.LoadReport(
        registration=reg, pools=[pb.PoolLoad(pool="upstream", requests=1)])]), timeout=5))
    say(**codes)


def flood(pb, rpc, socket, n):
    import grpc

    def channel():
        return rpc.ControlStub(dial(socket, own_connection=True))

    reg = channel().Register(request(pb)).registration
    held, refused = [], 0
    for _ in range(n):
        call = channel().WatchTargets(pb.WatchTargetsRequest(registration=reg))
        try:
            next(call)  # the current targets come at once
            held.append(call)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            refused += 1
    say(registration=reg, held=len(held), refused=refused)
    while True:  # hold the streams, never read them again
        time.sleep(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--proto-root", required=True)
    ap.add_argument("scenario", choices=["register", "intrude", "malformed", "flood"])
    ap.add_argument("arg", nargs="?")
    a = ap.parse_args()

    pb, rpc = stubs(a.proto_root)
    stub = rpc.ControlStub(dial(a.socket))
    if a.scenario == "register":
        register(pb, stub)
    elif a.scenario == "intrude":
        intrude(pb, stub, a.arg)
    elif a.scenario == "malformed":
        malformed(pb, stub)
    else:
        flood(pb, rpc, a.socket, int(a.arg))


if __name__ == "__main__":
    main()
