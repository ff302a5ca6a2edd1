"""Reading delimited / Parquet tables with enough bookkeeping to blame a line.

Every value is read as text first and converted column by column, so that a
bad value is reported with its file, line and column instead of turning into
NaN (and later into a silently wrong metric).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from services.trainer.data.errors import DataError


@dataclass(frozen=True)
class Table:
    """Text cells plus the source line of every row."""

    path: Path
    frame: pd.DataFrame  # all columns str (missing cells are "")
    lines: np.ndarray  # int64, 1-based line (or row) number of each frame row

    def __len__(self) -> int:
        return len(self.frame)

    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.frame.columns]
        if missing:
            have = ", ".join(map(str, self.frame.columns))
            raise DataError(
                self.path, f"missing column (the header has: {have})", line=1, column=missing[0]
            )

    def text(self, column: str) -> list[str]:
        self.require(column)
        return [str(v) for v in self.frame[column].tolist()]

    def non_empty(self, column: str) -> list[str]:
        values = self.text(column)
        for i, v in enumerate(values):
            if v.strip() == "":
                raise DataError(self.path, "empty value", line=int(self.lines[i]), column=column)
        return [v.strip() for v in values]

    def numbers(self, column: str, integer: bool = False) -> np.ndarray:
        """The column as float64 (or int64); the first non-numeric cell is an error."""
        values = self.non_empty(column)
        parsed = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(parsed)
        if integer:
            bad |= np.isfinite(parsed) & (parsed != np.round(parsed))
        if bad.any():
            i = int(np.argmax(bad))
            kind = "an integer" if integer else "a finite number"
            raise DataError(
                self.path, f"not {kind}: {values[i]!r}", line=int(self.lines[i]), column=column
            )
        return parsed.astype(np.int64) if integer else parsed

    def timestamps(self, column: str) -> np.ndarray:
        """Unix seconds as int64; ISO dates are accepted too (cell by cell)."""
        values = self.non_empty(column)
        numeric = pd.to_numeric(pd.Series(values), errors="coerce")
        parsed = numeric.to_numpy(dtype=np.float64, copy=True)
        bad = ~np.isfinite(parsed)
        if bad.any():
            rows = np.flatnonzero(bad)
            dates = pd.to_datetime(
                pd.Series([values[i] for i in rows]), errors="coerce", utc=True, format="mixed"
            )
            missing = dates.isna().to_numpy()
            if missing.any():
                i = int(rows[int(np.argmax(missing))])
                raise DataError(
                    self.path,
                    f"not a timestamp (Unix seconds or ISO date): {values[i]!r}",
                    line=int(self.lines[i]),
                    column=column,
                )
            seconds = dates.to_numpy(dtype="datetime64[s]").astype(np.int64)
            parsed[rows] = seconds
        return parsed.astype(np.int64)


def read_table(
    path: Path,
    sep: str = ",",
    names: list[str] | None = None,
    encoding: str = "utf-8",
) -> Table:
    """Read a CSV/TSV (``names`` given: no header row) or a Parquet file.

    Line numbers assume one record per line, which holds unless a quoted
    field spans lines (then they are off by the number of embedded newlines).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty", line=1)
    if path.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet(path)
    header = 0 if names is None else None
    try:
        frame = pd.read_csv(
            path,
            sep=sep,
            header=header,
            names=names,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
            encoding=encoding,
            quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE,
            engine="c",
            index_col=False,
        )
    except UnicodeDecodeError as exc:
        # The parser's offset is relative to its buffer; decode the file to find the line.
        line = None
        try:
            path.read_bytes().decode(encoding)
        except UnicodeDecodeError as whole:
            line = _line_of_offset(path, whole.start)
        raise DataError(path, f"not valid {encoding} text ({exc.reason})", line=line) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(path, "file is empty", line=1) from exc
    except pd.errors.ParserError as exc:
        found = re.search(r"line (\d+)", str(exc))
        raise DataError(
            path, f"cannot parse: {exc}".strip(), line=int(found.group(1)) if found else None
        ) from exc
    frame = frame.fillna("")
    frame.columns = [str(c).strip() for c in frame.columns]
    first = 2 if names is None else 1
    lines = np.arange(first, first + len(frame), dtype=np.int64)
    blank = (frame.astype(str).apply(lambda c: c.str.strip()) == "").all(axis=1).to_numpy()
    # Blank lines (a trailing newline too many) carry nothing; dropping them keeps numbering.
    frame = frame.loc[~blank].reset_index(drop=True)
    lines = lines[~blank]
    if len(frame) == 0:
        raise DataError(path, "no data rows", line=first)
    if names is not None:
        ragged = frame[names[-1]].astype(str) == ""
        if ragged.any():
            i = int(np.argmax(ragged.to_numpy()))
            raise DataError(
                path,
                f"expected {len(names)} fields separated by {sep!r}",
                line=int(lines[i]),
                column=names[-1],
            )
    return Table(path=path, frame=frame, lines=lines)


def _read_parquet(path: Path) -> Table:
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(path, f"not a readable Parquet file ({exc})") from exc
    if len(frame) == 0:
        raise DataError(path, "no data rows", line=1)
    text = frame.astype(object).where(frame.notna(), "").astype(str)
    text.columns = [str(c) for c in frame.columns]
    return Table(path=path, frame=text, lines=np.arange(1, len(frame) + 1, dtype=np.int64))


def _line_of_offset(path: Path, offset: int) -> int:
    with path.open("rb") as fh:
        return fh.read(offset).count(b"\n") + 1
