"""ConfigError: a configuration value that stops start-up, named by its key."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration value that stops start-up; names the key and the problem."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem
