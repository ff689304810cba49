"""Generation at scale: many requests over every device and every process, resumable.

    from dynamicid_jax.generation import BatchSampler, Job, run_jobs, run_requests_file

`engine` plans shares and batches and runs them (any list of Jobs: a requests file, an
evaluation's cases, one request of `launch/sample.py` or the app); `requests` reads a JSON Lines requests file; `run` is
`launch/sample.py --requests`.
"""

from dynamicid_jax.generation.engine import (BatchSampler, Job, RequestSampler, RunStats, gather_totals, jobs_of,
                                              plan_batches, run_jobs, run_request)
from dynamicid_jax.generation.requests import Reject, read_requests
from dynamicid_jax.generation.run import run_requests_file

__all__ = ["BatchSampler", "Job", "Reject", "RequestSampler", "RunStats", "gather_totals", "jobs_of", "plan_batches",
           "read_requests", "run_jobs", "run_request", "run_requests_file"]
