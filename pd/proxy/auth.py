"""The optional API key: every ``/v1/*`` request must carry ``Authorization: Bearer <key>``.

A plain ASGI middleware, so it runs before routing (an unknown ``/v1/...`` path is a
401 too, not a 404 that confirms the API exists) and leaves streamed answers and
disconnect detection untouched. ``/health`` and ``/metrics`` stay open: load
balancers and Prometheus poll them without credentials, and they carry no prompts.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from pd.proxy.errors import error_response


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _protected(scope["path"]):
            await self._app(scope, receive, send)
            return
        problem = self._problem(scope)
        if problem is None:
            await self._app(scope, receive, send)
            return
        response = error_response(401, problem, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _problem(self, scope: Scope) -> str | None:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            return "Missing API key: send it as `Authorization: Bearer <key>`"
        scheme, _, token = header.partition(b" ")
        # Constant time, so the key cannot be guessed byte by byte from response times.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._expected):
            return "Incorrect API key provided"
        return None


def _protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")
