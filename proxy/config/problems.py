"""What reading a route table reports, errors and warnings alike: `file:line path: message`."""

from __future__ import annotations

from dataclasses import dataclass

# The path of a problem with the whole file rather than one value in it.
FILE = "(file)"


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        text = f"{self.file}:{self.line} {self.path}: {self.message}"
        # A name the reader refused as not text may still be part of a path or message;
        # printing it must not raise.
        return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems
