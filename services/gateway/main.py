"""`coldstart serve gateway`: the public API."""

from __future__ import annotations

import logging

from services.common.server import ServiceApp, ServiceParts
from services.gateway.auth import Authenticator, AuthInterceptor, parse_tokens
from services.gateway.catalog import registry_fallback
from services.gateway.core import GatewayCore, KafkaEventSink
from services.gateway.downstream import DownstreamCaller, EncoderClient, FusionClient, make_channel
from services.gateway.servicer import SERVICE_NAME, GatewayServicer, add_gateway_servicer
from services.gateway.settings import GatewaySettings

log = logging.getLogger("coldstart.gateway")


def build(settings: GatewaySettings) -> ServiceParts:
    tls = (settings.downstream_ca_file, settings.downstream_cert_file, settings.downstream_key_file)
    # One long-lived channel per target for the life of the process.
    encoder_channel = make_channel(settings.encoder_address, *tls)
    fusion_channel = make_channel(settings.fusion_address, *tls)
    encoder = EncoderClient(
        encoder_channel,
        DownstreamCaller("encoder", settings.downstream_timeout_s, settings.downstream_retries),
    )
    fusion = FusionClient(
        fusion_channel,
        DownstreamCaller("fusion", settings.downstream_timeout_s, settings.downstream_retries),
    )
    events = KafkaEventSink(
        settings.kafka_bootstrap, settings.events_topic, settings.produce_timeout_s
    )
    core = GatewayCore(settings, events, encoder, fusion, registry_fallback(settings.registry_dir))
    authenticator = Authenticator(
        parse_tokens(settings.auth_tokens),
        settings.rate_limit_per_second,
        settings.rate_limit_burst,
    )
    if not settings.auth_tokens:
        log.warning("auth_tokens is empty: the gateway accepts unauthenticated calls")

    def close() -> None:
        events.close()
        encoder_channel.close()
        fusion_channel.close()

    return ServiceParts(
        servicers=[
            (add_gateway_servicer, GatewayServicer(core, authenticator, fusion.recommend_wire))
        ],
        service_names=[SERVICE_NAME],
        close=close,
        interceptors=[AuthInterceptor(authenticator)],
    )


APP = ServiceApp(name="gateway", settings_type=GatewaySettings, build=build)
