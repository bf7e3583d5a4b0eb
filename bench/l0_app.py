"""L0 ceiling: the barest aiohttp app - one POST route that parses a small JSON body with
orjson and returns it. run.py loads it with wrk over loopback.

    python -m bench.l0_app PORT
"""
import sys

import orjson
from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/echo", echo)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
