"""Settings: one typed dataclass per service, read from a TOML file and
environment variables, validated when a service starts (in ``main``, never at
import time).

Precedence, lowest first: dataclass defaults, the ``[<section>]`` table of the
TOML file (``--config`` or ``COLDSTART_CONFIG``), environment variables
``COLDSTART_<SECTION>_<KEY>``, then ``--set key=value`` overrides. Unknown keys
and wrongly typed values are errors that name their source.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is unknown, mistyped or out of range. The message is one line."""


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What every gRPC service has. Service settings subclass this."""

    host: str = "127.0.0.1"
    port: int = 50051
    # Prometheus metrics on a separate HTTP port; 0 disables the endpoint.
    metrics_port: int = 0
    max_workers: int = 32
    # Server processes sharing the port (SO_REUSEPORT): Python handlers are
    # bound by the GIL, so one machine scales with processes. On Kubernetes
    # keep 1 and scale with pods.
    processes: int = 1
    # Seconds in-flight calls get to finish after SIGTERM.
    grace_seconds: float = 10.0
    max_receive_message_bytes: int = 4 * 1024 * 1024
    max_send_message_bytes: int = 16 * 1024 * 1024
    log_level: str = "INFO"
    # TLS: both set = TLS; plus a client CA = mutual TLS.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""

    def validate(self) -> None:
        """Raise SettingsError for values no server could run with."""
        check_port("port", self.port, allow_zero=True)
        check_port("metrics_port", self.metrics_port, allow_zero=True)
        check_positive("max_workers", self.max_workers)
        check_positive("processes", self.processes)
        check_positive("max_receive_message_bytes", self.max_receive_message_bytes)
        check_positive("max_send_message_bytes", self.max_send_message_bytes)
        if self.grace_seconds < 0:
            raise SettingsError(f"grace_seconds: must be >= 0, got {self.grace_seconds}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(
                f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingsError("tls_cert_file and tls_key_file: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise SettingsError(
                "tls_client_ca_file: mutual TLS needs tls_cert_file and tls_key_file"
            )
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise SettingsError(f"{name}: file not found: {value}")


def check_port(name: str, value: int, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise SettingsError(f"{name}: must be a port number {low}..65535, got {value}")


def check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise SettingsError(f"{name}: must be > 0, got {value}")


def load_settings(
    cls: type[T],
    section: str,
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build and validate ``cls`` from defaults, file, environment and overrides."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    environ = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}

    path = config_file or environ.get("COLDSTART_CONFIG")
    if path:
        for key, raw in _read_section(Path(path), section).items():
            source = f"{path} [{section}] {key}"
            if key not in fields:
                raise SettingsError(f"{source}: unknown setting{_suggest(key, fields)}")
            values[key] = _coerce(raw, hints[key], source, from_text=False)

    prefix = f"COLDSTART_{section.upper()}_"
    for env_key, raw in environ.items():
        if not env_key.startswith(prefix):
            continue
        key = env_key[len(prefix) :].lower()
        if key not in fields:
            raise SettingsError(f"{env_key}: unknown setting{_suggest(key, fields)}")
        values[key] = _coerce(raw, hints[key], env_key, from_text=True)

    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise SettingsError(f"--set {item}: expected key=value")
        if key not in fields:
            raise SettingsError(f"--set {key}: unknown setting{_suggest(key, fields)}")
        values[key] = _coerce(raw, hints[key], f"--set {key}", from_text=True)

    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if callable(validate):
        try:
            validate()
        except SettingsError as exc:
            raise SettingsError(f"[{section}] {exc}") from None
    return settings


def _read_section(path: Path, section: str) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    table = document.get(section, {})
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: [{section}] must be a table")
    return table


def _suggest(key: str, fields: Mapping[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(fields))})"


def _coerce(raw: Any, hint: Any, source: str, *, from_text: bool) -> Any:
    """Convert ``raw`` to ``hint``; text comes from env vars and --set."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw is None or (from_text and raw == ""):
            return None
        return _coerce(raw, options[0], source, from_text=from_text)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(hint) or (str,)
        if from_text:
            items = [p.strip() for p in str(raw).split(",") if p.strip()]
        elif isinstance(raw, list):
            items = raw
        else:
            raise SettingsError(f"{source}: expected a list, got {raw!r}")
        converted = [_coerce(i, item_type, source, from_text=from_text) for i in items]
        return tuple(converted) if origin is tuple else converted
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and str(raw).lower() in {"1", "true", "yes", "on"}:
            return True
        if from_text and str(raw).lower() in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{source}: expected true or false, got {raw!r}")
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_text:
            try:
                return int(str(raw).strip())
            except ValueError:
                pass
        raise SettingsError(f"{source}: expected an integer, got {raw!r}")
    if hint is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if from_text:
            try:
                return float(str(raw).strip())
            except ValueError:
                pass
        raise SettingsError(f"{source}: expected a number, got {raw!r}")
    if hint is str:
        if isinstance(raw, str):
            return raw
        raise SettingsError(f"{source}: expected a string, got {raw!r}")
    raise SettingsError(f"{source}: unsupported setting type {hint!r}")
