"""One family of user-facing errors, mapped to exit code 2 by the CLI in one place."""

from __future__ import annotations


class LosscheckError(Exception):
    """A problem with what the user gave us (config, file, option): one line, exit code 2."""

    exit_code = 2


class ConfigError(LosscheckError):
    """A bad configuration: names the file, the key, the bad value and what is allowed."""

    def __init__(self, source: str, key: str, problem: str, allowed: str | None = None):
        # A quoted bad value can be megabytes (a list of a million items): the message stays a
        # line. The problem's start names what is wrong; its tail is the value.
        key, problem = shorten(key, 80), shorten(problem, 200)
        self.source, self.key, self.problem, self.allowed = source, key, problem, allowed
        msg = f"{source}: key '{key}': {problem}" if key else f"{source}: {problem}"
        if allowed:
            msg += f"; allowed: {allowed}"
        super().__init__(msg)


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


class ResultsError(LosscheckError):
    """A results file that cannot be read (missing, not JSON, wrong schema version)."""


class ReferenceUnavailable(Exception):
    """The reference cannot be computed on this platform; the point is skipped, not failed."""
