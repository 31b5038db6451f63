"""serving/server.py's _bind: the listening socket the server (and the router) hand uvicorn.

Regression: it was made without IPPROTO_TCP, so asyncio did not set TCP_NODELAY on the connections it
accepted, and every response on a kept-alive connection (headers and body written apart) waited for
the client's delayed ACK: ~40 ms per request, on /health as on completions."""
from __future__ import annotations

import asyncio
import socket

from scaleinfer.serving.server import _bind


def test_connections_accepted_on_the_bound_socket_have_nagle_off():
    async def main():
        sock = _bind("127.0.0.1", 0)
        port = sock.getsockname()[1]
        accepted = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer):
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(accepted, 30)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) != 0
