"""``mode="dask"``: the plain calls as Dask tasks, at most ``workers`` at a time.

Which cluster: the ``distributed.Client`` given as ``cluster=`` (opero never closes it); else the
scheduler address given as ``cluster=`` (a string, or a cluster object such as ``LocalCluster``)
or in ``DASK_SCHEDULER_ADDRESS``, through a client of opero's own that it closes with the
function; else the process's default Dask client, if there is one; else a ``LocalCluster`` of
``workers`` single-threaded worker processes without a dashboard, started on the first call,
shared by every ``mode="dask"`` function of the process and closed when the last of them is
closed (or at exit). opero never closes a cluster it did not start.

Dask reschedules a task whose worker died and gives up after
``distributed.scheduler.allowed-failures`` deaths with ``KilledWorker``; that, or a task lost
with its scheduler, reaches the caller as :class:`~opero.errors.WorkerCrashedError`.

Before the first call opero waits until the cluster has workers (all ``workers`` of its own local
cluster, at least one of another) and each has imported opero, for at most ``ready_timeout``
seconds.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from concurrent.futures import CancelledError
from typing import Any

import distributed
from distributed.scheduler import KilledWorker

from opero._log import logger
from opero.concurrency._remote import ClusterBackend, _Call, decode, invoke, not_ready, warm
from opero.errors import WorkerCrashedError


class DaskBackend(ClusterBackend):
    """Dask tasks; the module docstring tells which cluster and what a dead worker gives."""

    engine = "dask"
    launch_in_callbacks = True  # client.submit is fine on the client's loop

    def __init__(self, workers: int, *, cluster: object = None) -> None:
        super().__init__(workers, cluster=cluster)
        self._client: Any = None
        self._own_client = False
        self._local: _LocalSession | None = None  # set while using opero's own local cluster

    @classmethod
    def check_cluster(cls, cluster: object) -> None:
        if isinstance(cluster, distributed.Client):
            if cluster.asynchronous:
                raise ValueError(
                    "cluster must be a synchronous distributed.Client (asynchronous=False)"
                )
            return
        if isinstance(cluster, str) and cluster:
            return
        if isinstance(getattr(cluster, "scheduler_address", None), str):
            return
        raise ValueError(
            "cluster must be a distributed.Client, a scheduler address (str) or a Dask cluster "
            f"object for mode='dask', got {cluster!r}"
        )

    def _connect(self) -> None:
        self._open()
        # opero's own cluster has `workers` processes; another has as many as its owner gave it.
        expected = self.workers if self._local is not None else 1
        try:
            self._client.wait_for_workers(expected, timeout=self.ready_timeout)
            # Each worker imports opero now, not while the first items are waiting.
            self._client.run(warm)
        except BaseException as exc:
            self._disconnect()
            if isinstance(exc, TimeoutError):
                raise not_ready(self.engine, self.ready_timeout, f"{expected} worker(s)") from exc
            raise

    def _open(self) -> None:
        cluster = self.cluster
        if isinstance(cluster, distributed.Client):
            self._client = cluster
            return
        if isinstance(cluster, str):
            address: str | None = cluster
        else:  # a cluster object, or None
            address = getattr(cluster, "scheduler_address", None)
        address = address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        if address is not None:
            logger.info("mode='dask': connecting to the Dask scheduler at %s", address)
            self._client = distributed.Client(  # type: ignore[no-untyped-call]
                address, set_as_default=False
            )
            self._own_client = True
            return
        with contextlib.suppress(ValueError):  # raised when there is no default client
            client = distributed.default_client()  # type: ignore[no-untyped-call]
            if not client.asynchronous:
                self._client = client
                return
        self._client = _local.acquire(self.workers)
        self._local = _local

    def _launch(self, call: _Call) -> None:
        name = getattr(call.fn, "__name__", "call")
        client = self._client
        task = client.submit(
            invoke, call.fn, call.args, call.kwargs, key=f"{name}-{uuid.uuid4().hex}", pure=False
        )
        call.handle = task
        # Wait and fetch on the client's own event loop: results of several tasks are then
        # fetched concurrently, not one after the other on Dask's single callback thread.
        client.loop.add_callback(self._collect, client, call, task)

    async def _collect(self, client: Any, call: _Call, task: Any) -> None:
        try:
            data = await client.gather(task, errors="raise", direct=False, asynchronous=True)
        except KilledWorker as exc:
            outcome: tuple[bool, Any] = (
                False,
                _crashed(f"Dask gave up on this item: {exc}", exc),
            )
        except (CancelledError, OSError) as exc:  # cancelled, or the scheduler went away
            outcome = False, _crashed(f"the Dask task was lost: {exc!r}", exc)
        except Exception as exc:  # invoke never raises: the engine failed around it
            outcome = False, exc
        else:
            outcome = decode(data)
        self._finished(call, *outcome)

    def _abort(self, calls: list[_Call]) -> None:
        tasks = [call.handle for call in calls if call.handle is not None]
        if tasks:
            try:
                self._client.cancel(tasks, force=True)
            except Exception as exc:  # the scheduler is gone
                logger.debug("mode='dask': could not cancel tasks: %r", exc)

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if self._local is not None:
            self._local = None
            _local.release()
        elif client is not None and self._own_client:
            with contextlib.suppress(Exception):
                client.close()


class _LocalSession:
    """The ``LocalCluster`` opero starts when no cluster is given: one per process, shared by
    every ``mode="dask"`` function (Dask's log silencing is process-wide too), closed when the
    last of them closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._cluster: Any = None
        self._client: Any = None

    def acquire(self, workers: int) -> Any:
        with self._lock:
            if self._client is None:
                logger.info(
                    "mode='dask': starting a local Dask cluster of %d worker processes", workers
                )
                cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    # the scheduler's HTTP endpoints (health, metrics) still need a port
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                )
                try:
                    client = distributed.Client(  # type: ignore[no-untyped-call]
                        cluster, set_as_default=False
                    )
                except BaseException:
                    cluster.close()
                    raise
                self._cluster, self._client = cluster, client
            self._users += 1
            return self._client

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
            client, self._client = self._client, None
            cluster, self._cluster = self._cluster, None
        with contextlib.suppress(Exception):
            client.close()
        with contextlib.suppress(Exception):
            cluster.close()


_local = _LocalSession()


def _crashed(message: str, cause: BaseException | None) -> WorkerCrashedError:
    error = WorkerCrashedError(message)
    error.__cause__ = cause
    return error
