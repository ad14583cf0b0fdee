"""What a job is, for every store and transport: its states and the one table of how they change, the
views read from a store, the event a finished job emits, and the messages callers see."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from .. import errors
from ..domain import SegmentOutcome, SegmentRequest
from ..limits import describe_bytes


class JobState(enum.Enum):
    IN_QUEUE = 1
    IN_PROGRESS = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]


# The state machine, as the only table of it: every store changes a job's state only along these edges
# (the Redis store's Lua scripts read it too, see `lua_transitions`).
#   IN_QUEUE → IN_PROGRESS   a worker claims it
#   IN_QUEUE → CANCELLED     cancelled while waiting (or claimed with a cancel pending)
#   IN_PROGRESS → COMPLETED | FAILED | CANCELLED   its claim finishes it
#   IN_PROGRESS → IN_QUEUE   handed back (a closing worker) or requeued (its replica was lost)
#   IN_PROGRESS → FAILED     requeued too often (its replicas kept dying)
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.IN_QUEUE: frozenset({JobState.IN_PROGRESS, JobState.CANCELLED}),
    JobState.IN_PROGRESS: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.IN_QUEUE}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class TransitionError(RuntimeError):
    """A store was asked for a change the table does not allow: a bug, never a caller's mistake."""


def check_transition(job_id: str, old: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[old]:
        raise TransitionError(f"job {job_id}: {old.name} → {new.name} is not a state change jobs make")


def lua_transitions() -> str:
    """`TRANSITIONS` as a Lua table literal: allowed[old][new] is true for every edge."""
    rows = ", ".join(f"{old.name}={{{', '.join(f'{new.name}=true' for new in sorted(news, key=str))}}}"
                     for old, news in TRANSITIONS.items())
    return "{" + rows + "}"


class CancelOutcome(enum.Enum):
    CANCELLED_IN_QUEUE = 1
    CANCELLING_IN_PROGRESS = 2
    ALREADY_CANCELLED = 3
    ALREADY_FINISHED = 4


@dataclass(frozen=True)
class JobSnapshot:
    """An immutable view of a job (taken on the event loop)."""

    id: str
    state: JobState
    queue_position: int
    progress: float
    logs: tuple[tuple[float, str], ...]
    error: BaseException | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    version: int
    tenant: str = ""  # whose request it is (`tenants`)

    @property
    def queue_seconds(self) -> float:
        return (self.started_at or self.submitted_at) - self.submitted_at


@dataclass(frozen=True)
class JobResult:
    """What a finished job's result needs, read in one call: the outcome, the request (without its image)
    and the time it waited."""

    id: str
    outcome: SegmentOutcome
    request: SegmentRequest
    queue_seconds: float


@dataclass(frozen=True)
class JobFinished:
    """The event a store emits when this process ended a job (listeners: metrics, webhooks)."""

    id: str
    state: JobState
    request: SegmentRequest
    submitted_at: float
    started_at: float | None
    finished_at: float
    error: BaseException | None = None
    outcome: SegmentOutcome | None = None


# -- request ids ------------------------------------------------------------------------------------------
ID_LENGTH = 32  # uuid4().hex: what every store issues


def new_id() -> str:
    return uuid.uuid4().hex


def is_issued_id(job_id: str) -> bool:
    """Whether `job_id` has the form of an id a store issues (anything else is unknown without a lookup)."""
    return len(job_id) == ID_LENGTH and all(c in "0123456789abcdef" for c in job_id)


def shown_id(job_id: str) -> str:
    """An id as messages quote it: in full when it is one we issue, else cut short (a caller's 100 KB id must
    not come back in an error, over the caller's own limit on status trailers)."""
    if len(job_id) <= 2 * ID_LENGTH:
        return repr(job_id)
    return f"{job_id[:ID_LENGTH]!r}… ({len(job_id)} characters)"


# -- messages: every store raises these, with these words ---------------------------------------------------
def not_found(job_id: str) -> errors.JobNotFound:
    if not is_issued_id(job_id):
        return errors.JobNotFound(f"no request with id {shown_id(job_id)}: request ids are {ID_LENGTH} "
                                  "hexadecimal characters")
    return errors.JobNotFound(f"no request with id {shown_id(job_id)} (unknown, or its result expired)")


def result_expired(job_id: str) -> errors.JobNotFound:
    return errors.JobNotFound(f"the result of request {shown_id(job_id)} expired")


def queue_full(queue_size: int) -> errors.QueueFull:
    return errors.QueueFull(f"the queue is full ({queue_size} requests waiting); retry later")


def queue_bytes_full(held: int, size: int, budget: int) -> errors.QueueFull:
    return errors.QueueFull(f"the queue holds {describe_bytes(held)} of images and this request's "
                            f"{describe_bytes(size)} would pass its budget of {describe_bytes(budget)}; retry later")


def image_size(request: SegmentRequest) -> int:
    """What a queued request holds of its image: the bytes or data URI as sent (a URL: its length)."""
    return len(request.image_value)


def shutting_down() -> errors.ShuttingDown:
    return errors.ShuttingDown("the server is shutting down and accepts no new requests")


CANCELLING_MESSAGE = "cancellation requested; stopping at the next decoder batch"
INTERNAL_ERROR = "internal error"  # what is kept of an error that is not a Sam2ServeError


def raise_unless_completed(job_id: str, state: JobState, error: BaseException | None) -> None:
    """What asking for the result of a job that has none raises: cancelled, failed, or not finished."""
    if state is JobState.COMPLETED:
        return
    if state is JobState.CANCELLED:
        raise errors.JobCancelled(f"request {shown_id(job_id)} was cancelled")
    if state is JobState.FAILED:
        raise error if error is not None else RuntimeError(INTERNAL_ERROR)
    raise errors.JobNotFinished(f"request {shown_id(job_id)} is {state.name}; its result is not ready")


def stored_error(error: BaseException) -> tuple[str, str]:
    """(kind, message) to keep of a job's error: our own errors by class name and message; anything else
    (a bug) as an internal error whose details stay in the server's log."""
    if isinstance(error, errors.Sam2ServeError):
        return type(error).__name__, str(error) or type(error).__name__
    return "", INTERNAL_ERROR


def error_from(kind: str, message: str) -> BaseException:
    """An error kept by `stored_error`, as an exception again (its status code follows from its class)."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.Sam2ServeError):
        return cls(message)
    return RuntimeError(INTERNAL_ERROR)
