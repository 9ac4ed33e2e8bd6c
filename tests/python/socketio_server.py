"""A Socket.IO server (python-socketio AsyncServer on aiohttp) for the end-to-end tests.

Usage: socketio_server.py PORT LOG. Listens on 127.0.0.1:PORT; the event `echo` is acknowledged
with its data, and also emitted back as the event `echoed`. Appends one line per HTTP request it
gets to LOG (`METHOD target upgrade-header`), so a test sees the long-polling requests and the
websocket upgrade. Prints `listening` once it serves.
"""

import sys

import socketio
from aiohttp import web

LOG = open(sys.argv[2], "a", buffering=1)


@web.middleware
async def log_requests(request, handler):
    LOG.write("%s %s %s\n" % (request.method, request.path_qs, request.headers.get("Upgrade", "-")))
    return await handler(request)


sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*")
app = web.Application(middlewares=[log_requests])
sio.attach(app)


@sio.event
async def echo(sid, data):
    await sio.emit("echoed", data, to=sid)
    return data


async def started(_app):
    print("listening", flush=True)


app.on_startup.append(started)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
