"""pegaflow-pd-proxy against two fake OpenAI servers on loopback: prefill gets max_tokens=1
first, decode gets the original request, and the decode stream reaches the client chunk by chunk."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

pytest.importorskip("pegaflow_vllm", reason="pegaflow-vllm is not installed in this environment")
aiohttp = pytest.importorskip("aiohttp", reason="the proxy needs aiohttp (a dependency of pegaflow-vllm)")
from aiohttp import web  # noqa: E402

from pegaflow_vllm.proxy import PDProxy  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeOpenAI:
    """Records what it got; answers JSON, or an SSE stream of three chunks when stream=true."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[str, dict]] = []
        self.port = free_port()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        app.router.add_get("/v1/models", self.models)
        return app

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append((request.path, body))
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(f"data: {json.dumps({'server': self.name, 'chunk': i})}\n\n".encode())
                await asyncio.sleep(0.01)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response({"server": self.name, "max_tokens": body.get("max_tokens")})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "tiny", "owned_by": self.name}]})


async def serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture
def servers():
    async def start():
        prefill, decode = FakeOpenAI("prefill"), FakeOpenAI("decode")
        proxy_port = free_port()
        proxy = PDProxy([f"http://127.0.0.1:{prefill.port}"], [f"http://127.0.0.1:{decode.port}"], timeout_s=10)
        runners = [await serve(prefill.app(), prefill.port), await serve(decode.app(), decode.port),
                   await serve(proxy.app(), proxy_port)]
        return prefill, decode, f"http://127.0.0.1:{proxy_port}", runners

    return start


def run(coro):
    return asyncio.run(coro)


def test_completion_goes_to_prefill_with_one_token_then_to_decode(servers):
    async def scenario():
        prefill, decode, url, runners = await servers()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 50}) as r:
                    answer = await r.json()
        finally:
            for runner in runners:
                await runner.cleanup()
        return prefill.seen, decode.seen, answer

    prefill_seen, decode_seen, answer = run(scenario())
    assert prefill_seen == [("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1, "stream": False})]
    assert decode_seen == [("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 50})]
    assert answer == {"server": "decode", "max_tokens": 50}


def test_chat_stream_is_relayed_from_decode(servers):
    async def scenario():
        prefill, decode, url, runners = await servers()
        chunks = []
        try:
            async with aiohttp.ClientSession() as s:
                body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                        "max_completion_tokens": 9, "stream_options": {"include_usage": True}}
                async with s.post(url + "/v1/chat/completions", json=body) as r:
                    assert r.headers["Content-Type"].startswith("text/event-stream")
                    async for line in r.content:
                        if line.strip():
                            chunks.append(line.decode().strip())
        finally:
            for runner in runners:
                await runner.cleanup()
        return prefill.seen, decode.seen, chunks

    prefill_seen, decode_seen, chunks = run(scenario())
    assert prefill_seen[0][1]["max_completion_tokens"] == 1 and prefill_seen[0][1]["stream"] is False
    assert "stream_options" not in prefill_seen[0][1]
    assert decode_seen[0][1]["stream"] is True and decode_seen[0][1]["max_completion_tokens"] == 9
    assert chunks == [f"data: {json.dumps({'server': 'decode', 'chunk': i})}" for i in range(3)] + ["data: [DONE]"]


def test_dead_prefill_still_answers_from_decode_and_other_paths_pass_through(servers):
    async def scenario():
        prefill, decode, url, runners = await servers()
        await runners[0].cleanup()  # the prefill server is gone
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}) as r:
                    answer = await r.json()
                async with s.get(url + "/v1/models") as r:
                    models = await r.json()
                async with s.post(url + "/v1/completions", data=b"not json") as r:
                    bad = r.status
        finally:
            for runner in runners[1:]:
                await runner.cleanup()
        return answer, models, bad

    answer, models, bad = run(scenario())
    assert answer == {"server": "decode", "max_tokens": 3}
    assert models["data"][0]["owned_by"] == "decode"
    assert bad == 400
