"""Errors a training run reports to its user, by the CLI, as one message without a traceback."""


class TrainingError(RuntimeError):
    """The run cannot start or go on; the message says why, and the last checkpoint is intact."""


class TrainingInterrupted(TrainingError):
    """The user stopped the run (Ctrl-C); the message says where the last checkpoint is."""
