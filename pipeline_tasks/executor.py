"""Where the per-batch work of the data stages runs: processes on this machine, or a Ray cluster.

``executor.kind: local`` (the default) runs the batches in a spawn process pool of the stage's own
``workers``; ``executor.kind: ray`` sends each batch to Ray as a task. With ``executor.ray_address``
null, Ray is started on this machine for the stage and stopped after it (a laptop needs no cluster);
``auto`` or ``<host>:6379`` attaches to a running cluster from inside it (a KubeRay head or worker
pod), and ``ray://<head>:10001`` attaches from outside through Ray Client. ``RAY_ADDRESS`` in the
environment is used when the param is null, as ``ray.init`` itself does. The cluster must run the
task image (the same ``pipeline_tasks`` and library versions): tasks import the stage's module.

Either way the results come back in submission order and at most ``window`` batches are in flight,
so a stage's outputs depend neither on the executor nor on the number of workers, and the memory
held by batches in flight stays bounded. Ray was chosen over hand-written remote workers because it
schedules, retries and moves the data of tasks on any cluster it runs on unchanged (ray.io docs:
"ray.init() local; the same code attaches to a Ray cluster").
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeline_tasks.config import ConfigError

logger = logging.getLogger(__name__)

KINDS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class ExecutorParams:
    kind: str = "local"  # local: a process pool on this machine; ray: Ray tasks
    ray_address: str | None = None  # null: RAY_ADDRESS, else a Ray started for the stage on this machine
    ray_object_store_mb: int = 256  # object store of a Ray started here (holds the batches in flight)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.ray_object_store_mb < 80:  # Ray refuses an object store under 75 MiB
            raise ValueError(f"ray_object_store_mb must be >= 80, got {self.ray_object_store_mb}")


def executor_params(params) -> ExecutorParams:
    """The ``executor`` section, or the default (local) where a params file has none."""
    return getattr(params, "executor", None) or ExecutorParams()


def ordered_map(
    fn: Callable[..., Any],
    jobs: Iterable[tuple],
    *,
    params: ExecutorParams,
    workers: int,
    per_worker: int = 2,
) -> Iterator[Any]:
    """``fn(*job)`` for each job, yielded in the jobs' order, at most ``per_worker`` per worker in flight.

    ``fn`` must be a module-level function (it is pickled by name). Local with ``workers`` 1 runs in
    this process. Jobs are drawn lazily, so a generator of large batches is read as results drain.
    Attached to a Ray cluster, the workers are the cluster's CPUs and the batches in flight wait in
    Ray's object store (which spills to disk), not in this process.
    """
    if params.kind == "ray":
        yield from _ray_map(fn, jobs, params, workers, per_worker)
        return
    if workers <= 1:
        for job in jobs:
            yield fn(*job)
        return
    # spawn: the workers must not inherit the parent's threads (DuckDB, pyarrow) or open files
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from _drain((pool.submit(fn, *job) for job in jobs), per_worker * workers, lambda f: f.result())


def _drain(submitted: Iterator[Any], window: int, result: Callable[[Any], Any]) -> Iterator[Any]:
    in_flight: collections.deque = collections.deque()
    for handle in submitted:
        in_flight.append(handle)
        if len(in_flight) >= window:
            yield result(in_flight.popleft())
    while in_flight:
        yield result(in_flight.popleft())


@contextlib.contextmanager
def ray_session(params: ExecutorParams, workers: int) -> Iterator[Any]:
    """``ray`` initialised for a stage: attached to ``ray_address`` / ``RAY_ADDRESS``, else started here
    with ``workers`` CPUs; a Ray this function started is shut down on exit."""
    try:
        import ray
    except ImportError as exc:  # the task image has it; a hand-made environment may not
        raise ConfigError(
            "executor.kind is ray but the ray package is not installed here (pip install ray==2.60.0, "
            "or executor.kind: local)"
        ) from exc
    if ray.is_initialized():
        yield ray
        return
    address = params.ray_address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    if address is None:
        # nothing listens beyond this run: a local Ray binds to loopback and is stopped with the stage
        options.update(
            num_cpus=workers,
            object_store_memory=params.ray_object_store_mb << 20,
            _node_ip_address="127.0.0.1",
        )
    logger.info("ray: %s", f"attaching to {address}" if address else f"starting a local Ray with {workers} CPUs")
    ray.init(address=address, **options)
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_map(fn, jobs, params: ExecutorParams, workers: int, per_worker: int) -> Iterator[Any]:
    with ray_session(params, workers) as ray:
        slots = max(int(ray.cluster_resources().get("CPU", workers)), 1)
        logger.info("ray: %d CPUs, %d batches in flight", slots, per_worker * slots)
        # a task lost with its node is run again (max_retries): the functions are pure
        remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        yield from _drain((remote.remote(*job) for job in jobs), per_worker * slots, ray.get)
