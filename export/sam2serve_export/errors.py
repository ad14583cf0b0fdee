"""Errors the export tools raise; each message is written for the person at the terminal."""


class ExportError(Exception):
    """A failure the user can act on. The CLI prints the message without a traceback."""


class UnknownModelError(ExportError):
    pass


class DownloadError(ExportError):
    pass


class ChecksumMismatchError(DownloadError):
    pass


class CheckpointError(ExportError):
    pass


class ParityError(ExportError):
    pass


class MissingDependencyError(ExportError):
    pass
