"""Errors a user can act on. Each message names the input and what was wrong with it."""


class CatdogError(Exception):
    """Base class for problems caused by the input or environment, not by a bug.

    `exit_code` is what the command line exits with: 2 when the input (the data, an option, a
    file given) is at fault, 1 when the machine is (a full disk).
    """

    exit_code = 2


class DataError(CatdogError):
    """The dataset (archive, folder or images) cannot be used as given."""


class ImageChangedError(DataError):
    """An image's bytes changed after the manifest hashed them (a folder still being written)."""


class DataCheckFailed(DataError):
    """This run's data differs from the data that trained production (--on-data-issue stop)."""


class ArchiveError(DataError):
    """An archive is corrupt, hostile (path traversal, links, zip bomb) or not an archive."""


class DownloadError(CatdogError):
    """A download failed."""


class TransientDownloadError(DownloadError):
    """A failure that may go away on retry: timeouts, dropped connections, HTTP 5xx and 429."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentDownloadError(DownloadError):
    """A failure that retrying will not fix: 404, 403, a checksum mismatch, a non-zip body."""


class WeightsError(CatdogError):
    """Pretrained weights could not be found, downloaded or loaded."""


class ModelError(CatdogError):
    """An unknown model name or a model file that cannot be loaded."""


class DiskSpaceError(CatdogError):
    """The artifacts' disk has too little free space for a stage's output."""

    exit_code = 1


class RunStopped(CatdogError):
    """A stage did not start, or stopped after its current epoch, because another stage of the
    same run failed first."""

    exit_code = 1


class StageFailed(Exception):
    """A stage of a run failed: a bug or a failure of the machine (exit code 1).

    The message names the stage and the cause, in one line, for the terminal and the UI.
    """

    exit_code = 1


class StageInputError(StageFailed, CatdogError):
    """A stage refused its input: a hostile archive, one class, an unreachable URL (exit 2)."""

    exit_code = 2
