class SlmlabError(Exception):
    """Bad input from the user. CLIs print `error: <message>` on one line and exit 2."""


class ConfigError(SlmlabError, ValueError):
    pass


class DataError(SlmlabError, ValueError):
    pass


class CheckpointError(SlmlabError, ValueError):
    pass
