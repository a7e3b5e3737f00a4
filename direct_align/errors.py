"""The exception types the CLI turns into one-line messages."""


class DirectAlignError(Exception):
    """Bad input or an impossible setting.

    The CLI prints ``error: <message>`` on one line and exits with status 2; the message must say
    what is wrong and where (file, line, row, field, option), never rely on a traceback.
    """


class ConfigError(DirectAlignError):
    """An invalid option, YAML key or combination of settings."""


class DataError(DirectAlignError):
    """An unreadable file, malformed row or a dataset that cannot be used."""


class Interrupted(DirectAlignError):
    """Training stopped by a signal after saving a checkpoint (exit status 143)."""


class NonFinite(DirectAlignError):
    """A loss, gradient norm or weight that is NaN or infinite, caught before it reached the
    weights or a saved file."""


def one_line(message: object, limit: int = 300) -> str:
    """A library's error message on one line: its lines joined, whitespace collapsed, cut at
    ``limit`` characters with an ellipsis (never mid-way without saying so)."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
