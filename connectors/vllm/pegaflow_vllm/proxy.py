"""``pegaflow-pd-proxy``: an OpenAI-compatible router for prefill/decode disaggregation.

Each completion request goes first to a prefill server (a vLLM with ``kv_role: kv_producer``)
with ``max_tokens=1``: it computes the prompt's KV and saves it into the pegaflow daemon before
answering. The same request then goes, unchanged, to a decode server (``kv_role: kv_consumer``),
which loads the prompt's blocks from the daemon and generates; its answer (streamed or not) is
what the client gets. The two servers never talk to each other: blocks are found by their
prefix hashes, so no transfer parameters travel through the proxy.

A failed prefill is logged and the request still goes to decode (which then computes the
prompt itself): the cache makes requests faster, never makes them fail.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

log = logging.getLogger("pegaflow.pd_proxy")

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class PDProxy:
    """Routes completions through prefill then decode; everything else goes to decode."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str], timeout_s: float = 600.0) -> None:
        if not prefill or not decode:
            raise ValueError("pegaflow-pd-proxy needs at least one --prefill and one --decode server")
        self._prefill = itertools.cycle([u.rstrip("/") for u in prefill])
        self._decode = itertools.cycle([u.rstrip("/") for u in decode])
        self._timeout = ClientTimeout(total=timeout_s)
        self._session: ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        app.router.add_get("/health", self._health)
        for path in COMPLETION_PATHS:
            app.router.add_post(path, self._completion)
        app.router.add_route("*", "/{tail:.*}", self._passthrough)
        return app

    async def _start(self, app: web.Application) -> None:
        self._session = ClientSession(timeout=self._timeout)

    async def _stop(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return web.json_response({"error": {"message": f"request body is not JSON: {exc}", "type": "invalid_request"}}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "request body must be a JSON object", "type": "invalid_request"}}, status=400)
        await self._prefill_once(request.path, body, _forward_headers(request))
        return await self._relay(request, next(self._decode), body)

    async def _prefill_once(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        """Run the prompt on a prefill server for its KV only (one token, no streaming)."""
        prefill_body = dict(body, max_tokens=1, stream=False)
        if "max_completion_tokens" in body:
            prefill_body["max_completion_tokens"] = 1
        prefill_body.pop("stream_options", None)
        url = next(self._prefill) + path
        assert self._session is not None
        try:
            async with self._session.post(url, json=prefill_body, headers=headers) as response:
                await response.read()
                if response.status >= 400:
                    log.warning("prefill at %s answered %d; decode computes the prompt itself", url, response.status)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("prefill at %s failed (%s); decode computes the prompt itself", url, exc)

    async def _relay(self, request: web.Request, base: str, body: dict[str, Any] | None) -> web.StreamResponse:
        """Forward to ``base`` and copy the answer back chunk by chunk (SSE streams included)."""
        assert self._session is not None
        url = base + request.path_qs
        kwargs: dict[str, Any] = {"headers": _forward_headers(request)}
        if body is not None:
            kwargs["json"] = body
        elif request.can_read_body:
            kwargs["data"] = await request.read()
        try:
            async with self._session.request(request.method, url, **kwargs) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS})
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (OSError, asyncio.TimeoutError) as exc:
            return web.json_response({"error": {"message": f"decode server {base} unreachable: {exc}", "type": "bad_gateway"}}, status=502)

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        return await self._relay(request, next(self._decode), None)


def _forward_headers(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pegaflow-pd-proxy",
        description="OpenAI-compatible router: prefill (max_tokens=1) on a kv_producer vLLM, then decode on a "
                    "kv_consumer vLLM; both share KV through the pegaflow daemon.",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", action="append", default=None, help="prefill server URL (repeatable; default http://127.0.0.1:8100)")
    parser.add_argument("--decode", action="append", default=None, help="decode server URL (repeatable; default http://127.0.0.1:8200)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per upstream request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    proxy = PDProxy(args.prefill or ["http://127.0.0.1:8100"], args.decode or ["http://127.0.0.1:8200"], args.timeout)
    web.run_app(proxy.app(), host=args.host, port=args.port, print=lambda *_: None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
