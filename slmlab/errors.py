class SlmlabError(Exception):
    """Bad input from the user. CLIs print `error: <message>` on one line and exit 2."""


class ConfigError(SlmlabError, ValueError):
    pass


class DataError(SlmlabError, ValueError):
    pass


class CheckpointError(SlmlabError, ValueError):
    pass


class RunDirError(CheckpointError, ConfigError):
    """A run directory that is missing or incomplete: a checkpoint problem, and a config error when
    a config key (train.teacher, train.init_from) names it."""
