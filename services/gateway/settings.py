"""Gateway settings (section [gateway], env COLDSTART_GATEWAY_<KEY>)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.ports import DEFAULT_PORTS, default_address
from services.common.settings import ServerSettings, SettingsError, check_positive


@dataclass(frozen=True)
class GatewaySettings(ServerSettings):
    port: int = DEFAULT_PORTS["gateway"].grpc
    fusion_address: str = default_address("fusion")
    encoder_address: str = default_address("encoder")
    kafka_bootstrap: str = "127.0.0.1:9092"
    events_topic: str = "coldstart.events"
    # Registry the popularity/content fallback reads when fusion is down.
    registry_dir: str = ""
    # "client-id:token" entries; empty = no authentication (logged as a warning).
    auth_tokens: list[str] = field(default_factory=list)
    # Per client: sustained requests per second and burst size; 0 = unlimited.
    rate_limit_per_second: float = 0.0
    rate_limit_burst: int = 100
    max_batch: int = 1000
    max_text_bytes: int = 8192
    max_attributes: int = 64
    max_k: int = 1000
    # Upper bound of any downstream call; the caller's own deadline is used when shorter.
    downstream_timeout_s: float = 2.0
    # Retries of idempotent downstream calls on UNAVAILABLE.
    downstream_retries: int = 2
    produce_timeout_s: float = 10.0
    idempotency_cache_size: int = 100_000
    # TLS towards encoder/fusion: CA to verify them (and our client cert for mTLS).
    downstream_ca_file: str = ""
    downstream_cert_file: str = ""
    downstream_key_file: str = ""

    def validate(self) -> None:
        super().validate()
        for entry in self.auth_tokens:
            client, sep, token = entry.partition(":")
            if not sep or not client or not token:
                raise SettingsError(
                    f"auth_tokens: entries must be 'client-id:token', got {entry!r}"
                )
        if self.rate_limit_per_second < 0:
            raise SettingsError("rate_limit_per_second: must be >= 0")
        check_positive("rate_limit_burst", self.rate_limit_burst)
        check_positive("max_batch", self.max_batch)
        check_positive("max_text_bytes", self.max_text_bytes)
        check_positive("max_k", self.max_k)
        check_positive("downstream_timeout_s", self.downstream_timeout_s)
        check_positive("produce_timeout_s", self.produce_timeout_s)
        if self.downstream_retries < 0:
            raise SettingsError("downstream_retries: must be >= 0")
        if not self.kafka_bootstrap:
            raise SettingsError("kafka_bootstrap: must be set")
