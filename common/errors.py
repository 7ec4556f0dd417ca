"""The errors a user can cause, each ending a script in one line and exit code 2 (`common.runs.cli`). They live
here, below every other module, so that any module can raise them without importing another."""


class UsageError(ValueError):
    """The command line cannot work: a flag value out of range or a combination of flags that conflict."""


class TaskError(ValueError):
    """A task id the user typed is unknown, or its simulator / data is not available."""


class DatasetError(ValueError):
    """A dataset file is missing, unreadable, or has the wrong keys, values or dimensions (one-line message)."""


class NonFiniteError(ValueError):
    """A loss, a weight or an action became NaN or inf: the run stops before it saves anything from that state."""
