"""Calls made together from many threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

C = TypeVar("C")
R = TypeVar("R")


def run_concurrently(calls: Sequence[C], target: Callable[[C], R]) -> list[R | BaseException]:
    """Call ``target(call)`` for every call on its own thread; results (or exceptions) in order."""
    results: list[R | BaseException] = [RuntimeError("not run")] * len(calls)
    start = threading.Barrier(len(calls))

    def one(n: int) -> None:
        start.wait()
        try:
            results[n] = target(calls[n])
        except BaseException as exc:
            results[n] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results
