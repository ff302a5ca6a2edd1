from __future__ import annotations

import json
import logging

from services.common.logs import JsonFormatter


def test_records_become_one_json_object_with_extra_fields() -> None:
    record = logging.makeLogRecord(
        {
            "name": "x",
            "levelname": "INFO",
            "levelno": 20,
            "msg": "hello %s",
            "args": ("you",),
            "port": 5,
        }
    )
    line = JsonFormatter("encoder").format(record)
    entry = json.loads(line)
    assert entry["msg"] == "hello you"
    assert entry["service"] == "encoder"
    assert entry["port"] == 5
    assert "\n" not in line
