"""The floor under every fleet figure: bare grpc.aio, one message and its answer per stream, no xDS at all.

Method: a grpc.aio server with one bidirectional method (identity serializers) and N client streams in one
client process (grpc.aio too, as the fleet simulator's clients). Once every stream is open, the server writes
a SIZE-byte message to every stream and waits for its one-message answer, ROUNDS times. It prints the wall time
of a fleet-wide round and the CPU per stream of the server and of the client process. This is what a push to N
proxies costs with nothing to decide, so it bounds what any control plane built on grpc.aio can reach on this
machine with its clients sharing the cores; `fleet_sim.py` figures sit on top of it.

    python benchmarks/grpc_floor.py --streams 1000 --size 10000 --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import grpc

SERVICE, METHOD = "floor.Probe", "Exchange"


def _identity(data: bytes) -> bytes:
    return data


def _cpu(times: os.times_result, children: bool = False) -> float:
    return times.children_user + times.children_system if children else times.user + times.system


def client_main(port: int, streams: int, rounds: int, conn: Connection) -> None:
    asyncio.run(_clients(port, streams, rounds, conn))


async def _clients(port: int, streams: int, rounds: int, conn: Connection) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(streams)]
    try:
        calls = [
            ch.stream_stream(f"/{SERVICE}/{METHOD}", request_serializer=_identity, response_deserializer=_identity)()
            for ch in channels
        ]
        for call in calls:
            await call.write(b"hello")
        conn.send(("open", _cpu(os.times())))
        await asyncio.gather(*(_answer(call, rounds) for call in calls))
        conn.send(("done", _cpu(os.times())))
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


async def _answer(call: Any, rounds: int) -> None:
    for _ in range(rounds):
        await call.read()
        await call.write(b"ack")
    await call.done_writing()


class Server:
    """Counts open streams, then drives every stream through ROUNDS write → answer rounds on `go`."""

    def __init__(self, streams: int, size: int, rounds: int) -> None:
        self.payload = b"x" * size
        self.streams, self.rounds = streams, rounds
        self.opened = 0
        self.all_open = asyncio.Event()
        self.go = asyncio.Event()
        self.round_done: list[int] = [0] * rounds
        self.round_end: list[float] = [0.0] * rounds

    async def handle(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        incoming = requests.__aiter__()
        await incoming.__anext__()
        self.opened += 1
        if self.opened == self.streams:
            self.all_open.set()
        await self.go.wait()
        for r in range(self.rounds):
            await context.write(self.payload)
            await incoming.__anext__()
            self.round_done[r] += 1
            if self.round_done[r] == self.streams:
                self.round_end[r] = time.monotonic()


async def main(streams: int, size: int, rounds: int) -> None:
    probe = Server(streams, size, rounds)
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        probe.handle, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    parent, child = mp.get_context("spawn").Pipe()
    process = mp.get_context("spawn").Process(target=client_main, args=(port, streams, rounds, child))
    process.start()
    try:
        loop = asyncio.get_running_loop()
        _, client_open_cpu = await loop.run_in_executor(None, parent.recv)
        await asyncio.wait_for(probe.all_open.wait(), 300)
        server_cpu0, started = _cpu(os.times()), time.monotonic()
        probe.go.set()
        _, client_done_cpu = await loop.run_in_executor(None, parent.recv)
        server_cpu = _cpu(os.times()) - server_cpu0
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
        await server.stop(0)
    report(streams, size, rounds, started, probe.round_end, server_cpu, client_done_cpu - client_open_cpu)


def report(
    streams: int, size: int, rounds: int, started: float, ends: list[float], server_cpu: float, client_cpu: float
) -> None:
    walls = [b - a for a, b in zip([started, *ends], ends, strict=False)]
    per = streams * rounds
    print(f"bare grpc.aio, {streams} streams x {rounds} rounds of one {size}-byte message and its answer")
    print(f"  wall per fleet-wide round: median {sorted(walls)[len(walls) // 2] * 1e3:.0f} ms")
    print(f"  server CPU per stream and round: {server_cpu / per * 1e6:.0f} µs")
    print(f"  client CPU per stream and round: {client_cpu / per * 1e6:.0f} µs (one grpc.aio client process)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.streams, args.size, args.rounds))
