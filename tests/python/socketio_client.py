"""A python-socketio client for the end-to-end tests: connects through the proxy with long-polling
first (the default), waits for the upgrade to websocket, then round-trips events.

Usage: socketio_client.py URL [CA_PEM]. Prints one JSON line with what it saw, then exits 0; any
failure raises (exit 1).
"""

import asyncio
import json
import ssl
import sys

import aiohttp
import socketio

EVENTS = 20


async def main(url, ca):
    connector = None
    if ca:
        context = ssl.create_default_context(cafile=ca)
        connector = aiohttp.TCPConnector(ssl=context)
    session = aiohttp.ClientSession(connector=connector)
    sio = socketio.AsyncClient(http_session=session, reconnection=False)
    echoed = asyncio.Queue()
    sio.on("echoed", lambda data: echoed.put_nowait(data))
    transports = []
    await sio.connect(url, transports=["polling", "websocket"], wait_timeout=10)
    transports.append(sio.transport())
    # The engine.io client probes and upgrades in the background after the polling connect.
    for _ in range(200):
        if sio.transport() == "websocket":
            break
        await asyncio.sleep(0.05)
    transports.append(sio.transport())
    acked = 0
    pushed = 0
    for i in range(EVENTS):
        payload = {"n": i, "text": "event %d " % i + "x" * (i * 50)}
        answer = await sio.call("echo", payload, timeout=10)
        assert answer == payload, (answer, payload)
        acked += 1
        back = await asyncio.wait_for(echoed.get(), 10)
        assert back == payload, (back, payload)
        pushed += 1
    transports.append(sio.transport())
    sid = sio.sid
    await sio.disconnect()
    await session.close()
    print(json.dumps({"transports": transports, "acked": acked, "pushed": pushed, "sid": sid}))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None), 60))
