"""One family of user-facing errors, mapped to exit code 2 by the CLI in one place."""
from __future__ import annotations


class LosscheckError(Exception):
    """A problem with what the user gave us (config, file, option): one line, exit code 2."""

    exit_code = 2


class ConfigError(LosscheckError):
    """A bad configuration: names the file, the key, the bad value and what is allowed."""

    def __init__(self, source: str, key: str, problem: str, allowed: str | None = None):
        self.source, self.key, self.problem, self.allowed = source, key, problem, allowed
        msg = f"{source}: key '{key}': {problem}" if key else f"{source}: {problem}"
        if allowed:
            msg += f"; allowed: {allowed}"
        super().__init__(msg)


class ResultsError(LosscheckError):
    """A results file that cannot be read (missing, not JSON, wrong schema version)."""


class ReferenceUnavailable(Exception):
    """The reference cannot be computed on this platform; the point is skipped, not failed."""
