"""Client library of the pagedgen inference service.

Depends only on grpcio and protobuf: never on torch nor on the server's
packages. The generated stubs live in ``pagedgen_client._proto.pagedgen.v1``
(``generate_pb2``, ``generate_pb2_grpc``).
"""

from ._channel import ChannelConfig, RetryPolicy
from .aio import AsyncClient
from .client import Client
from .errors import PagedgenClientError
from .types import GenerateChunk, ModelInfo, ServerInfo, ServerLimits, Stats, TokenLogprob, ToolCall, Usage

__all__ = [
    "AsyncClient",
    "ChannelConfig",
    "Client",
    "GenerateChunk",
    "ModelInfo",
    "PagedgenClientError",
    "RetryPolicy",
    "ServerInfo",
    "ServerLimits",
    "Stats",
    "TokenLogprob",
    "ToolCall",
    "Usage",
]
