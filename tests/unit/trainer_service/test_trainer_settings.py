"""Trainer settings: every bad value is refused with a message naming the setting."""

from __future__ import annotations

import pytest

from services.common.settings import SettingsError, load_settings
from services.trainer.settings import DEFAULT_TRAIN_COMMAND, TrainerSettings


def test_defaults_are_valid_and_use_coldstart_train() -> None:
    settings = load_settings(TrainerSettings, "trainer", environ={})
    assert settings.train_command_template() == DEFAULT_TRAIN_COMMAND
    assert "--registry {registry}" in DEFAULT_TRAIN_COMMAND
    assert settings.sqlite_synchronous == "NORMAL"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train_command={python} -m x --bogus {nope}", "unknown placeholder {nope}"),
        ("train_command=python 'unclosed", "cannot be split"),
        ("dead_letter_topic=coldstart.events", "dead_letter_topic: must differ"),
        ("sqlite_synchronous=OFF", "sqlite_synchronous: must be NORMAL or FULL"),
        ("gate_threshold=1.5", "gate_threshold: must be in [0, 1)"),
        ("holdout_fraction=0", "holdout_fraction"),
        ("keep_versions=0", "keep_versions: must be > 0"),
        ("workers=0", "workers: must be > 0"),
        ("device=tpu", "device: must be cpu or cuda"),
        ("scorer=not a callable", "scorer: expected module:function"),
        ("debug_pause_point=somewhere", "debug_pause_point"),
        ("retrain_every_events=-1", "retrain_every_events: must be >= 0"),
        ("group_id= ", "group_id: must not be empty"),
    ],
)
def test_bad_settings_name_the_setting(override: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(TrainerSettings, "trainer", environ={}, overrides=[override])
    assert message in str(raised.value)
    assert str(raised.value).startswith("[trainer]")
