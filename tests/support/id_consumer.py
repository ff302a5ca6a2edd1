"""Consumer subprocess for the at-least-once test: appends each event id to a
file, fsyncs, and only then commits the offsets. Run until it reaches the
partitions' end offsets (taken when it starts)."""

from __future__ import annotations

import argparse
import os
import sys

from kafka import TopicPartition

from services.common.events import decode_event
from services.common.kafka_consumer import make_consumer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    consumer = make_consumer(args.bootstrap, args.group, max_poll_records=500)
    partitions = [
        TopicPartition(args.topic, p)
        for p in sorted(consumer.partitions_for_topic(args.topic) or ())
    ]
    consumer.assign(partitions)
    end = consumer.end_offsets(partitions)
    with open(args.out, "a") as out:
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            batches = consumer.poll(timeout_ms=500)
            if not batches:
                continue
            for records in batches.values():
                for record in records:
                    out.write(decode_event(record.value).event_id + "\n")
            out.flush()
            os.fsync(out.fileno())
            consumer.commit()  # only after the ids are durable
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
