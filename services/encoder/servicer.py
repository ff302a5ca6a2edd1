"""gRPC face of the encoder: convert, pass the deadline on, call the core."""

from __future__ import annotations

import time

import grpc
from coldstart.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

from services.encoder.core import EncoderCore


def absolute_deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on ``time.monotonic()``, or None when it has none."""
    remaining = context.time_remaining()
    # grpcio reports "no deadline" as None or as an enormous number.
    if remaining is None or remaining > 10**8:
        return None
    return time.monotonic() + max(0.0, remaining)


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, core: EncoderCore) -> None:
        self.core = core

    def Embed(
        self, request: encoder_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.EmbedResponse:
        vectors = self.core.embed(list(request.texts), absolute_deadline(context))
        return encoder_pb2.EmbedResponse(
            vectors=[common_pb2.Vector(values=row) for row in vectors.tolist()],
            dimension=self.core.dimension,
            model=self.core.model_id,
        )
