"""`slm-llm` subcommands of this package."""


def register(sub, add_config_args) -> None:
    """Add this package's subparsers to ``sub``; each sets ``fn`` to a function(args) -> exit code."""
