"""The one exception type that reaches users as a one-line message."""


class DirectAlignError(Exception):
    """Bad input or an impossible setting.

    The CLI prints ``error: <message>`` on one line and exits with status 2; the message must say
    what is wrong and where (file, line, row, field, option), never rely on a traceback.
    """


class ConfigError(DirectAlignError):
    """An invalid option, YAML key or combination of settings."""


class DataError(DirectAlignError):
    """An unreadable file, malformed row or a dataset that cannot be used."""
