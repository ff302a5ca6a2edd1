"""Bad input surfaces as one error naming the file, the line and the column."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A data file cannot be used as it is.

    ``line`` is 1-based and counts the header line (what an editor shows);
    ``column`` is the column name (or "field N" for header-less files). For
    Parquet files ``line`` is the 1-based row number.
    """

    def __init__(
        self, path: Path | str, problem: str, line: int | None = None, column: str | None = None
    ) -> None:
        where = str(path)
        if line is not None:
            where += f":{line}"
        if column is not None:
            where += f": column {column!r}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.column = column
        self.problem = problem
