"""The job layer: a store keeps jobs (`memory`, `redis`), one `Worker` runs them, and `JobService` is the
data plane that protocol adapters call. States and their changes are in `model`."""

from .model import CancelOutcome, JobFinished, JobResult, JobSnapshot, JobState
from .service import JobService
from .store import Claim, JobStore
from .worker import Runner, Worker

__all__ = ["CancelOutcome", "Claim", "JobFinished", "JobResult", "JobService", "JobSnapshot", "JobState",
           "JobStore", "Runner", "Worker"]
