"""A small TCP proxy on loopback whose connections can be frozen: a network partition.

``FreezableProxy(upstream_url)`` listens on an ephemeral 127.0.0.1 port and forwards every
connection to the server ``upstream_url`` names: a TCP host and port, or a Unix-socket
directory (the embedded server listens only there), so a test can reach either through
it. :meth:`FreezableProxy.url` rewrites a connection string to go through the proxy.

:meth:`FreezableProxy.freeze` stops forwarding, in both directions, on the connections
whose first bytes (the client's startup packet, which carries ``application_name``)
contain a marker, without closing them: each side's kernel still accepts and acknowledges
what is sent, but nothing arrives. That is what a silent partition looks like to both
ends, and what TCP keepalives cannot notice (the proxy's kernel answers them). New
matching connections stay frozen too until :meth:`thaw`. Everything is bounded: each
connection is two tasks, all ended by :meth:`close`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from psycopg.conninfo import conninfo_to_dict, make_conninfo

# How many of the client's first bytes are kept to match against (the startup packet is
# a few hundred bytes; an SSL or GSS negotiation request, 8 bytes, may come first).
_HELLO_BYTES = 4096
_CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's first bytes and whether it is frozen."""

    hello: bytearray = field(default_factory=bytearray)
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    pumps: int = 0  # how many of its two directions still run


class FreezableProxy:
    """See the module docstring. Use as ``async with FreezableProxy(url) as proxy``."""

    def __init__(self, upstream_url: str) -> None:
        params = conninfo_to_dict(upstream_url)
        self._host = str(params.get("host") or "localhost").split(",")[0]
        self._port = int(str(params.get("port") or 5432).split(",")[0])
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Markers whose connections are frozen now (written by freeze()/thaw()).
        self._frozen: list[bytes] = []
        self.port = 0

    async def __aenter__(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def url(self, conninfo: str) -> str:
        """``conninfo`` pointed at the proxy (TCP on loopback, no SSL negotiation)."""
        return make_conninfo(
            conninfo, host="127.0.0.1", port=str(self.port), sslmode="disable", gssencmode="disable"
        )

    @property
    def connections(self) -> int:
        """How many connections are open through the proxy now."""
        return len(self._links)

    def freeze(self, marker: bytes = b"") -> int:
        """Stop forwarding on every connection whose first bytes contain ``marker`` (every
        connection for ``b""``), now and for new ones until :meth:`thaw`; return how many
        existing connections were frozen."""
        self._frozen.append(marker)
        frozen = 0
        for link in self._links:
            if self._matches(link) and link.flowing.is_set():
                link.flowing.clear()
                frozen += 1
        return frozen

    def thaw(self) -> None:
        """Forward again on every connection, what was held back included."""
        self._frozen.clear()
        for link in self._links:
            link.flowing.set()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for link in self._links:
            for writer in link.writers:
                writer.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    # ------------------------------------------------------------------ internals

    def _matches(self, link: _Link) -> bool:
        return any(marker in link.hello for marker in self._frozen)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writers=[writer])
        link.flowing.set()
        self._links.append(link)
        try:
            if self._host.startswith("/"):  # a Unix-socket directory, as libpq reads it
                up_reader, up_writer = await asyncio.open_unix_connection(
                    f"{self._host}/.s.PGSQL.{self._port}"
                )
            else:
                up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.close()
            self._links.remove(link)
            return
        link.writers.append(up_writer)
        link.pumps = 2
        for source, sink, outbound in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pump(link, source, sink, outbound=outbound))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        outbound: bool,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(_CHUNK):
                if outbound and len(link.hello) < _HELLO_BYTES:
                    link.hello += data[: _HELLO_BYTES - len(link.hello)]
                    if self._matches(link):  # a new connection of a frozen kind
                        link.flowing.clear()
                # Held here while frozen: nothing more is read, so the kernel buffers
                # fill and then the sender's writes block, as on a dead path.
                await link.flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()
        link.pumps -= 1
        if not link.pumps and link in self._links:  # both directions ended: forget it
            self._links.remove(link)
