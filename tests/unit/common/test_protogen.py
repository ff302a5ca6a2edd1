from __future__ import annotations

from services.common.protogen import stale_files


def test_generated_code_matches_the_protos() -> None:
    # Fails when a .proto changed without `make proto` (or gen/ was edited by hand).
    assert stale_files() == []
