"""The error types (minilora/errors.py): the tests/test_errors_*.py files catch specific ones; all of
them derive from one base, so a script can catch MiniLoraError alone and the command line prints each
as one line."""

import inspect

import minilora.errors
from minilora.errors import CheckpointError, ConfigError, DataError, MiniLoraError


def test_every_error_here_is_a_minilora_error():
    assert all(issubclass(e, MiniLoraError) for e in (CheckpointError, ConfigError, DataError))
    declared = [c for _, c in inspect.getmembers(minilora.errors, inspect.isclass)
                if issubclass(c, Exception) and c.__module__ == minilora.errors.__name__]
    assert len(declared) > 3 and all(issubclass(e, MiniLoraError) for e in declared)
