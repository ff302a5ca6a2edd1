from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.settings import ServerSettings, SettingsError, load_settings


@dataclass(frozen=True)
class DemoSettings(ServerSettings):
    model_dir: str = "models/x"
    batch: int = 8
    ratio: float = 0.5
    cached: bool = True
    topics: list[str] | None = None


def test_defaults_without_file_or_env() -> None:
    settings = load_settings(DemoSettings, "demo", environ={})
    assert settings == DemoSettings()


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[demo]\nbatch = 16\nratio = 2\nmodel_dir = "from-file"\n[other]\nbatch = "x"\n'
    )
    settings = load_settings(
        DemoSettings,
        "demo",
        config_file=config,
        environ={"COLDSTART_DEMO_BATCH": "32", "COLDSTART_DEMO_CACHED": "false"},
        overrides=["model_dir=from-set", "topics=a, b"],
    )
    assert settings.batch == 32  # env beats file
    assert settings.ratio == 2.0  # ints are accepted where floats are expected
    assert settings.cached is False
    assert settings.model_dir == "from-set"  # --set beats all
    assert settings.topics == ["a", "b"]


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[demo]\nbatch = 4\n")
    settings = load_settings(DemoSettings, "demo", environ={"COLDSTART_CONFIG": str(config)})
    assert settings.batch == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"environ": {"COLDSTART_DEMO_BACTH": "3"}},
            "COLDSTART_DEMO_BACTH: unknown setting (did you mean 'batch'?)",
        ),
        (
            {"environ": {"COLDSTART_DEMO_BATCH": "many"}},
            "COLDSTART_DEMO_BATCH: expected an integer, got 'many'",
        ),
        ({"environ": {"COLDSTART_DEMO_CACHED": "maybe"}}, "expected true or false"),
        ({"overrides": ["port=70000"]}, "port: must be a port number 0..65535, got 70000"),
        ({"overrides": ["nonsense"]}, "--set nonsense: expected key=value"),
        ({"overrides": ["max_workers=0"]}, "max_workers: must be > 0"),
        (
            {"overrides": ["tls_cert_file=/x.pem"]},
            "tls_cert_file and tls_key_file: set both or neither",
        ),
        ({"overrides": ["log_level=LOUD"]}, "log_level"),
    ],
)
def test_bad_values_name_their_source(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(DemoSettings, "demo", environ=kwargs.pop("environ", {}), **kwargs)  # type: ignore[arg-type]
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_file_errors_name_file_section_and_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[demo]\nbatch = "eight"\n')
    with pytest.raises(
        SettingsError, match=r"c.toml \[demo\] batch: expected an integer, got 'eight'"
    ):
        load_settings(DemoSettings, "demo", config_file=config, environ={})
    config.write_text("[demo]\nunknown_key = 1\n")
    with pytest.raises(SettingsError, match=r"\[demo\] unknown_key: unknown setting"):
        load_settings(DemoSettings, "demo", config_file=config, environ={})
    config.write_text("[demo\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(DemoSettings, "demo", config_file=config, environ={})
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(DemoSettings, "demo", config_file=tmp_path / "missing.toml", environ={})


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError, match="tls_key_file: file not found"):
        load_settings(
            DemoSettings,
            "demo",
            environ={},
            overrides=[f"tls_cert_file={cert}", f"tls_key_file={tmp_path / 'nokey.pem'}"],
        )
