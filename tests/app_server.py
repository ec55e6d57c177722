"""A local HTTP app for delivery tests: it records every request exactly as it arrived (headers in
order, with their case, the body's bytes) and answers as the test says. Built on h11, so that
nothing between the wire and the record rewrites what the relay or the agent sent."""

import dataclasses
import functools
from collections.abc import Callable
from contextlib import asynccontextmanager

import h11
import trio


@dataclasses.dataclass
class Received:
    method: str
    target: str  # the path and query, as sent
    headers: list[tuple[str, str]]  # every header, in order, names as sent
    body: bytes
    at: float  # trio.current_time()

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclasses.dataclass
class Answer:
    status: int = 200
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    delay: float = 0.0  # seconds before answering


class App:
    """Where the app listens, what it received, and how it answers (`answer`, called with each
    request, may be replaced by the test)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answer: Callable[[Received], Answer] = lambda request: Answer()
        self.url = ""
        self.arrived = trio.Event()  # set at each request, then replaced

    async def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        with trio.fail_after(timeout):
            while len(self.received) < count:
                await self.arrived.wait()
        return self.received

    async def serve(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=2**20)
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(2**16)
                    connection.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, bytearray()
                    while not isinstance(event := connection.next_event(), h11.EndOfMessage):
                        if event is h11.NEED_DATA:
                            connection.receive_data(await stream.receive_some(2**16))
                        elif isinstance(event, h11.Data):
                            body += event.data
                    received = Received(request.method.decode(), request.target.decode(),
                                        [(name.decode(), value.decode("latin-1"))
                                         for name, value in request.headers.raw_items()],
                                        bytes(body), trio.current_time())
                    self.received.append(received)
                    self.arrived.set()
                    self.arrived = trio.Event()
                    answer = self.answer(received)
                    if answer.delay:
                        await trio.sleep(answer.delay)
                    headers = [(name.encode(), value.encode()) for name, value in answer.headers]
                    headers.append((b"content-length", str(len(answer.body)).encode()))
                    await stream.send_all(connection.send(h11.Response(status_code=answer.status, headers=headers)))
                    await stream.send_all(connection.send(h11.Data(data=answer.body)) + connection.send(h11.EndOfMessage()))
                    connection.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await stream.aclose()


@asynccontextmanager
async def running_app():
    """An App listening on 127.0.0.1, port 0, until the block ends."""
    app = App()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, app.serve, 0, host="127.0.0.1"))
        app.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        try:
            yield app
        finally:
            nursery.cancel_scope.cancel()
