"""The floor under every fleet figure: bare grpc.aio, one message and its answer per stream, no xDS at all.

Method: a grpc.aio server with one bidirectional method (identity serializers) and N client streams spread over
--workers client processes (grpc.aio too, as the fleet simulator's clients), each stream on its own TCP
connection as every Envoy has its own (--shared-connection multiplexes them all on one, which is much cheaper
and not what a fleet looks like). Once every stream is open, the server writes a SIZE-byte message to every
stream and waits for its one-message answer, ROUNDS times. It prints the wall time of a fleet-wide round and
the CPU per stream of the server and of the clients. This is what a push to N proxies costs with nothing to
decide, so it bounds what any control plane built on grpc.aio can reach on this machine with its clients sharing
the cores; `fleet_sim.py` figures sit on top of it.

HTTP/2 settings are those of a real fleet: the server with controlplane's xDS server options (no BDP probing), the
clients with Envoy's 256 MiB flow-control windows and no BDP pings. --grpc-defaults uses grpc's defaults on
both sides instead, to show what they cost.

    python benchmarks/grpc_floor.py --streams 1000 --size 83000 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import grpc
from fleet_client import ENVOY_WINDOW  # the simulated Envoys' HTTP/2 settings

from controlplane.xds.server import SERVER_OPTIONS  # the xDS server's, so the floor is measured as served

SERVICE, METHOD = "floor.Probe", "Exchange"
WAVE = 50
CLIENT_OPTIONS = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", ENVOY_WINDOW))


def _identity(data: bytes) -> bytes:
    return data


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def client_main(port: int, streams: int, rounds: int, options: tuple[tuple[str, Any], ...], conn: Connection) -> None:
    asyncio.run(_clients(port, streams, rounds, options, conn))


async def _clients(
    port: int, streams: int, rounds: int, options: tuple[tuple[str, Any], ...], conn: Connection
) -> None:
    channels: list[grpc.aio.Channel] = []
    calls = []
    try:
        for _ in range(0, streams, WAVE):  # thousands of connects at once from one process make grpc fail some
            opened = await asyncio.gather(*(_open(port, options) for _ in range(min(WAVE, streams - len(calls)))))
            channels += [channel for channel, _ in opened]
            calls += [call for _, call in opened]
        conn.send(_cpu())
        await asyncio.gather(*(_answer(call, rounds) for call in calls))
        conn.send(_cpu())
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


async def _open(port: int, options: tuple[tuple[str, Any], ...], attempts: int = 5) -> tuple[grpc.aio.Channel, Any]:
    """A started call on its own channel; retried on a new channel as Envoy reconnects, since a burst of new calls
    sees some CANCELLED by grpc core before the server's handler runs (see fleet_client.py)."""
    for attempt in range(attempts):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        await channel.channel_ready()
        call = channel.stream_stream(
            f"/{SERVICE}/{METHOD}", request_serializer=_identity, response_deserializer=_identity
        )()
        try:
            await call.write(b"hello")
            return channel, call
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await channel.close()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


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


async def main(args: argparse.Namespace) -> None:
    probe = Server(args.streams, args.size, args.rounds)
    server = grpc.aio.server(options=() if args.grpc_defaults else SERVER_OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(
        probe.handle, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    options = () if args.grpc_defaults else CLIENT_OPTIONS
    if not args.shared_connection:
        options += (("grpc.use_local_subchannel_pool", 1),)
    spawn = mp.get_context("spawn")
    share = [args.streams // args.workers + (i < args.streams % args.workers) for i in range(args.workers)]
    pipes = [spawn.Pipe() for _ in share]
    workers = [
        spawn.Process(target=client_main, args=(port, n, args.rounds, options, child))
        for n, (_, child) in zip(share, pipes, strict=True)
    ]
    for worker in workers:
        worker.start()
    try:
        loop = asyncio.get_running_loop()
        opened = [
            await loop.run_in_executor(None, _receive, parent, worker)
            for (parent, _), worker in zip(pipes, workers, strict=True)
        ]
        await asyncio.wait_for(probe.all_open.wait(), 300)
        server_cpu0, started = _cpu(), time.monotonic()
        probe.go.set()
        done = [
            await loop.run_in_executor(None, _receive, parent, worker)
            for (parent, _), worker in zip(pipes, workers, strict=True)
        ]
        server_cpu = _cpu() - server_cpu0
    finally:
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
        await server.stop(0)
    report(args, started, probe.round_end, server_cpu, sum(done) - sum(opened))


def _receive(parent: Connection, worker: Any) -> float:
    """The worker's next CPU reading; a worker that died ends the benchmark instead of hanging it."""
    while not parent.poll(1.0):
        if not worker.is_alive():
            raise SystemExit(f"client process exited with {worker.exitcode}")
    value: float = parent.recv()
    return value


def report(args: argparse.Namespace, started: float, ends: list[float], server_cpu: float, client_cpu: float) -> None:
    walls = [b - a for a, b in zip([started, *ends], ends, strict=False)]
    per = args.streams * args.rounds
    sharing = "all on ONE shared TCP connection" if args.shared_connection else "one TCP connection each"
    settings = "grpc's default HTTP/2 settings" if args.grpc_defaults else "no BDP probing, Envoy's windows"
    print(f"bare grpc.aio: {args.streams} streams ({sharing}; {settings}), {args.workers} client processes,")
    print(f"  {args.rounds} rounds of one {args.size}-byte message and its answer")
    ordered = sorted(walls)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * len(ordered)) - 1)]
    print(
        f"  wall per fleet-wide round: median {statistics.median(walls) * 1e3:.0f} ms, p90 {p90 * 1e3:.0f} ms, "
        f"max {max(walls) * 1e3:.0f} ms"
    )
    print(f"  server CPU per stream and round: {server_cpu / per * 1e6:.0f} µs")
    print(f"  client CPU per stream and round: {client_cpu / per * 1e6:.0f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="client processes (the fleet simulator's default)")
    parser.add_argument("--shared-connection", action="store_true", help="multiplex every stream on one connection")
    parser.add_argument("--grpc-defaults", action="store_true", help="grpc's HTTP/2 defaults on both sides")
    asyncio.run(main(parser.parse_args()))
