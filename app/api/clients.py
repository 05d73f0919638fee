"""Who sent a request, for the engine's fair shares between clients within a priority class (docs/engine.md).

A client is its API key (`X-API-Key`; on the OpenAI-compatible route also `Authorization: Bearer KEY`, which
OpenAI's clients send), else the name it gives in `X-Client-Id`, else "anonymous". The key itself
never goes past this module: the engine, the metrics and the logs see `key:` and the first 12 hex digits of its
SHA-256, stable across restarts and replicas. An `X-Client-Id` is a name the client claims, not a credential: it
shows as `id:` and the name (in the per-client metrics too), and a weight given to it is for whoever sends it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Header

from app.engine import ANONYMOUS

API_KEY_HEADER = "X-API-Key"
CLIENT_ID_HEADER = "X-Client-Id"
CLIENT_ID_PATTERN = r"^[A-Za-z0-9._@:+-]{1,64}$"
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header (OpenAI's clients send their api_key so); else None."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


def key_client(api_key: str) -> str:
    """The client of an API key: a short hash of it, never the key."""
    return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


def client_of(api_key: str | None, client_id: str | None) -> str:
    """The client of a request's headers; ValueError naming X-Client-Id where it is no name the metrics can carry."""
    if api_key:
        return key_client(api_key)
    if client_id:
        if not _CLIENT_ID.fullmatch(client_id):
            raise ValueError(
                f"{CLIENT_ID_HEADER} must be 1 to 64 letters, digits or any of . _ @ : + - (a name for this client)"
            )
        return "id:" + client_id
    return ANONYMOUS


def weights_by_client(weights: Mapping[str, float]) -> dict[str, float]:
    """CFG_CLIENT_WEIGHTS (name -> weight, each name an API key or an X-Client-Id) as the engine's clients."""
    by_client: dict[str, float] = {}
    for name, weight in weights.items():
        by_client[key_client(name)] = weight
        if _CLIENT_ID.fullmatch(name):
            by_client["id:" + name] = weight
    return by_client


async def request_client(
    x_api_key: Annotated[
        str | None, Header(alias=API_KEY_HEADER, description="the client's API key: its fair share of rows")
    ] = None,
    x_client_id: Annotated[
        str | None,
        Header(
            alias=CLIENT_ID_HEADER,
            pattern=CLIENT_ID_PATTERN,
            description="without an API key, the client's name for its fair share of rows (docs/engine.md)",
        ),
    ] = None,
) -> str:
    """The request's client, for the routes that take the /generate body (a bad X-Client-Id: 422 naming it)."""
    return client_of(x_api_key, x_client_id)


ClientDep = Annotated[str, Depends(request_client)]
