"""The one error type of the repository, carrying the gRPC status it maps to."""

from __future__ import annotations

import grpc


class RepositoryError(Exception):
    """A repository or lookup failure with Triton's status code and wording."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
