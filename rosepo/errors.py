"""rosepo's own error types: every refusal of bad input or config is one of these.

The CLI turns them into one line on stderr and exit code 2; anything else is a bug.
"""

from __future__ import annotations


class RosepoError(Exception):
    """Base class of every error rosepo raises on purpose."""


class ConfigError(RosepoError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(RosepoError):
    """Input data is malformed. Names the file, row (or line) and column where they are known.

    ``row`` is 1-based over data rows (a header, if any, is not counted), or over the samples of
    a JSON list; ``line`` is a 1-based line of the file, for errors in the text itself (JSON syntax).
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None, line: int | None = None):
        self.file, self.row, self.column, self.line, self.reason = file, row, column, line, message
        where = []
        if file is not None:
            where.append(f"file {file}")
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class TrainingError(RosepoError):
    """Training cannot go on: a non-finite loss or gradient norm (names the stage, the step and
    the batch's rows)."""


class FetchError(RosepoError):
    """A download failed or its checksum did not match."""


class DownloadError(FetchError):
    """A download could not be made at all (offline, no reachable index): nothing was checked."""
