"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "service_unavailable",
    504: "timeout",
}


class ProxyError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(
    status: int, message: str, param: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={
            "error": {
                "message": message,
                "type": _TYPES.get(status, default_type),
                "param": param,
                "code": status,
            }
        },
    )
