"""The one error family: every error slm_llm raises on purpose derives from :class:`SlmError`.

Its message says what is wrong and where (file, line, field or key) in one line, so the CLI
prints it as is and exits 2; any other exception is a bug, reported as an internal error with
the path of its traceback (``slm_llm/cli``). Each package keeps its own subclass next to the
code that raises it (``ConfigError``, ``DataError``, ``RunError``, ``ModelError``,
``RouterError``, ``ServeError``, ...).
"""


class SlmError(Exception):
    """An error the user can act on; the message is the whole story."""
