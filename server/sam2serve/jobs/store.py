"""The narrow interface between the job layer and where jobs are kept (`memory.MemoryJobStore` in this
process, `redis.RedisJobStore` shared by replicas). A store applies the state changes of `model.TRANSITIONS`
atomically, fences every write of a claim (progress, logs, the final state) so that a claim that lost its
job changes nothing, and emits `JobFinished` for the jobs this process ended."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Protocol

from ..domain import SegmentOutcome, SegmentRequest
from .model import CancelOutcome, JobFinished, JobResult, JobSnapshot, JobState

FinishedListener = Callable[[JobFinished], None]


@dataclass(frozen=True)
class Claim:
    """A worker's hold on one run of a job; `token` fences everything the run writes."""

    job_id: str
    token: str
    request: SegmentRequest


class JobStore(Protocol):
    shared: bool  # other processes run its jobs too (a draining worker leaves queued jobs to them)
    reachable: bool  # the store answers (a shared store's server may not); health follows it

    async def reachability_changed(self) -> bool:
        """Wait until `reachable` changes; its new value."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> None:
        """Stop; claims still held here go back to the front of the queue (shared stores)."""
        ...

    # -- callers, on the event loop --------------------------------------------------------------------------
    async def add(self, request: SegmentRequest) -> JobSnapshot:
        """Queue a new job; `QueueFull` when the queue is at its bound."""
        ...

    async def snapshot(self, job_id: str) -> JobSnapshot: ...

    def changes(self, job_id: str) -> AsyncGenerator[JobSnapshot, None]:
        """The current state, then every change (queue position included), ending with a terminal state."""
        ...

    async def result(self, job_id: str) -> JobResult:
        """What a completed job's result needs, in one read; the job's error when it has no result."""
        ...

    async def cancel(self, job_id: str) -> tuple[CancelOutcome, JobSnapshot]: ...

    def waiting(self) -> float:
        """Jobs waiting, as this process's share (for metrics); safe to call from any thread."""
        ...

    def unfinished_here(self) -> list[str]:
        """Unfinished jobs whose state and result only this process holds (in-process: every unfinished
        job; a shared store: none, other replicas answer for them)."""
        ...

    def finished_here_since(self, since: float) -> list[str]:
        """Jobs whose state and result only this process holds that ended at or after `since` (wall clock),
        newest first (in-process: those; a shared store: none)."""
        ...

    # -- workers, on the event loop --------------------------------------------------------------------------
    async def claim(self, timeout_s: float, url: bool | None = None) -> Claim | None:
        """The next queued job, now IN_PROGRESS and held by the returned claim; None when none came within
        `timeout_s` (0: don't wait). `url` True: the next whose image is a URL; False: the next whose image
        is not; None: the next."""
        ...

    async def finish(self, claim: Claim, state: JobState, outcome: SegmentOutcome | None = None,
                     error: BaseException | None = None) -> bool:
        """End the claimed run; False (nothing changed) when the claim no longer holds the job."""
        ...

    async def hand_back(self, claim: Claim) -> None:
        """The claimed job back to the front of the queue, not counted as an attempt."""
        ...

    def release(self, claim: Claim) -> None:
        """The worker holds `claim` no longer: it finished or handed back its job, or gave up on doing so (a
        store error). A job still held for a released claim goes back to the queue (shared stores)."""
        ...

    # -- workers, from the thread that runs the job ----------------------------------------------------------
    def stop_requested(self, claim: Claim) -> bool:
        """True once the job was cancelled or the claim no longer holds it."""
        ...

    def report_progress(self, claim: Claim, fraction: float) -> None: ...

    def add_log(self, claim: Claim, message: str) -> None: ...
