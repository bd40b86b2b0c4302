"""Errors that belong to one request and become its 4xx response; everything else is a server fault."""

from __future__ import annotations


class RequestError(ValueError):
    """A problem with what the client sent. ``status`` is the HTTP status its response gets."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status
