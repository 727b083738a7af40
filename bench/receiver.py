"""A webhook sink for benchmarks: answers 200 and counts, in its own process.

python bench/receiver.py PORT        (GET /count returns the number of POSTs)

It also stands in for an OpenTelemetry collector (POST /v1/traces, not counted), for
the runs with tracing on.
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

count = 0


async def hook(request: web.Request) -> web.Response:
    global count
    await request.read()
    count += 1
    return web.Response(text="ok")


async def traces(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(content_type="application/x-protobuf", body=b"")


async def get_count(_request: web.Request) -> web.Response:
    return web.Response(text=str(count))


async def reset(_request: web.Request) -> web.Response:
    global count
    count = 0
    return web.Response(text="0")


def main() -> None:
    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_put("/hook", hook)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", get_count)
    app.router.add_post("/reset", reset)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
