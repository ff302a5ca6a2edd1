from __future__ import annotations

import pytest

from services.common.settings import SettingsError, load_settings
from services.encoder.settings import EncoderSettings


def test_defaults_are_valid() -> None:
    settings = load_settings(EncoderSettings, "encoder", environ={})
    assert settings.port == 50051
    assert settings.provider == "auto"
    assert settings.batching is True


def test_environment_and_overrides() -> None:
    settings = load_settings(
        EncoderSettings,
        "encoder",
        environ={"COLDSTART_ENCODER_MAX_BATCH": "64", "COLDSTART_ENCODER_INT8": "true"},
        overrides=["max_wait_ms=0.5", "provider=cpu", "intra_op_threads=2"],
    )
    assert (settings.max_batch, settings.int8, settings.max_wait_ms) == (64, True, 0.5)
    assert (settings.provider, settings.intra_op_threads) == ("cpu", 2)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("provider=tpu", "provider"),
        ("max_batch=0", "max_batch"),
        ("max_wait_ms=-1", "max_wait_ms"),
        ("intra_op_threads=-2", "intra_op_threads"),
        ("cache_size=-1", "cache_size"),
        ("max_text_bytes=0", "max_text_bytes"),
        ("max_queued_texts=10", "max_queued_texts"),
        ("max_tokens_per_run=-1", "max_tokens_per_run"),
    ],
)
def test_bad_values_name_the_setting(override: str, words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        load_settings(EncoderSettings, "encoder", environ={}, overrides=[override])


def test_model_path_and_version_exclude_each_other() -> None:
    with pytest.raises(SettingsError, match="model_path and version"):
        load_settings(
            EncoderSettings, "encoder", environ={}, overrides=["model_path=/x", "version=v1"]
        )
