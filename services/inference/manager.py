"""The served models: which versions are loaded, their worker pools, and what is ready.

The manager reads the model repository, starts one :class:`WorkerPool` per served version
(the version policy picks them), resolves a request's model and version to its pool, and
keeps the service's readiness: ready while every loaded model has a ready worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.common.errors import NotFound, Unavailable
from services.common.logs import fields
from services.inference import ipc, reasons
from services.inference.batching import BatchPolicy
from services.inference.metrics import InferenceMetrics
from services.inference.pool import PoolSettings, WorkerHealth, WorkerPool, WorkerState
from services.inference.reasons import clip
from services.inference.repository import ModelConfig, ModelEntry, scan
from services.inference.stats import InferenceStatistics, RequestTimer, VersionStatistics

log = logging.getLogger(__name__)


class ModelState:
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


Fingerprint = tuple[str, tuple[int, ...], tuple[int, ...]]


def fingerprint(entry: ModelEntry) -> Fingerprint:
    """What identifies a model's loaded state: its config, selected versions and their files' mtimes."""
    stamps = []
    for version in entry.versions:
        directory = entry.path / str(version)
        newest = directory.stat().st_mtime_ns
        for item in directory.rglob("*"):
            newest = max(newest, item.stat().st_mtime_ns)
        stamps.append(newest)
    return entry.digest, tuple(entry.versions), tuple(stamps)


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig | None = None
    digest: str = ""
    fingerprint: Fingerprint | None = None
    pools: dict[str, WorkerPool] = field(default_factory=dict)  # serving, by version
    loading: set[str] = field(default_factory=set)
    draining: list[WorkerPool] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # version ("" = the model) -> why it did not load
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def newest(self) -> str:
        return max(self.pools, key=int)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class ModelManager:
    """Loads, reloads and unloads models without dropping requests.

    A new version or a changed config starts new worker pools beside the serving ones; traffic
    moves when they are ready, and the old pools drain (their accepted requests finish) before
    their workers stop. A load that fails leaves what was serving untouched and reports why.
    """

    def __init__(
        self,
        *,
        repository: Path,
        pool_settings: PoolSettings,
        metrics: InferenceMetrics,
        on_readiness: Callable[[bool], None] = lambda ready: None,
        start_timeout: float = 120.0,
        poll_seconds: float = 0.0,
        cpu_budget: int = 0,
    ):
        self._repository = repository
        self._pool_settings = pool_settings
        self._metrics = metrics
        self._on_readiness = on_readiness
        self._start_timeout = start_timeout
        self._poll_seconds = poll_seconds
        self._cpu_budget = cpu_budget
        self._models: dict[str, LoadedModel] = {}
        self._shm_prefix = f"{ipc.SERVICE_PREFIX}{os.getpid()}-"
        self._ready = False
        self._scanned = False
        self._drains: set[asyncio.Task[None]] = set()
        metrics.workers.source = self.worker_counts
        self.statistics = InferenceStatistics()

    # -- loading --------------------------------------------------------------------------

    async def run(self) -> None:
        """Load the repository, then (if polling is on) follow its changes."""
        await self.sync()
        while self._poll_seconds > 0:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.sync()
            except Exception:
                log.exception("repository.sync_failed")

    async def _scan(self) -> dict[str, tuple[ModelEntry, Fingerprint]]:
        def read() -> dict[str, tuple[ModelEntry, Fingerprint]]:
            return {name: (entry, fingerprint(entry)) for name, entry in scan(self._repository).items()}

        return await asyncio.to_thread(read)

    async def sync(self) -> None:
        """Bring the served models in line with the repository."""
        entries = await self._scan()
        if not self._scanned:
            log.info("repository.scanned", extra=fields(path=str(self._repository), models=sorted(entries)))
        self._scanned = True
        changed = [
            self._reload(entry, stamp)
            for entry, stamp in entries.values()
            if entry.name not in self._models or self._models[entry.name].fingerprint != stamp
        ]
        removed = [self.unload(name, missing_ok=True) for name in list(self._models) if name not in entries]
        await asyncio.gather(*changed, *removed)
        self._changed()

    async def load(self, name: str) -> None:
        """(Re)load one model from the repository now: RepositoryModelLoad."""
        entries = await self._scan()
        if name not in entries:
            raise NotFound(f"model {name} is not in the repository", reason=reasons.MODEL_NOT_FOUND)
        entry, stamp = entries[name]
        if not await self._reload(entry, stamp, force=True):
            model = self._models.get(name)
            reason = next(iter(model.failed.values()), "it did not load") if model else "it did not load"
            raise Unavailable(f"model {name} failed to load: {reason}")

    def _new_pool(self, entry: ModelEntry, config: ModelConfig, version: str) -> WorkerPool:
        dynamic = config.dynamic_batching
        return WorkerPool(
            model_name=entry.name,
            model_version=version,
            model_dir=entry.path,
            workers=config.min_workers,
            max_workers=config.max_workers,
            settings=self._pool_settings,
            metrics=self._metrics,
            shm_prefix=self._shm_prefix,
            on_change=self._changed,
            batching=BatchPolicy()
            if dynamic is None
            else BatchPolicy(
                config.max_batch_size, dynamic.max_queue_delay_microseconds / 1e6, dynamic.preferred_batch_size
            ),
            cpu_budget=self._cpu_budget,
        )

    async def _reload(self, entry: ModelEntry, stamp: Fingerprint, *, force: bool = False) -> bool:
        model = self._models.setdefault(entry.name, LoadedModel(entry.name, entry.path))
        async with model.lock:
            if not force and model.fingerprint == stamp:
                return True
            model.fingerprint = stamp  # a failure is not retried until something changes
            config = entry.config
            if config is None or entry.error:
                return self._failed(model, {"": entry.error or "invalid configuration"})
            targets = [str(version) for version in entry.versions]
            same_config = model.digest == entry.digest and not force
            keep = {v: pool for v, pool in model.pools.items() if v in targets and same_config}
            fresh = {v: self._new_pool(entry, config, v) for v in targets if v not in keep}
            model.loading = set(fresh)
            self._changed()
            for pool in fresh.values():
                pool.start()
            # A replacement takes traffic only with all its workers up: half a pool would stall the switch.
            try:
                ready = await asyncio.gather(
                    *(pool.wait_ready(self._start_timeout, every_worker=bool(model.pools)) for pool in fresh.values())
                )
            except BaseException:  # cancelled (the service stops): the starting workers stop with it
                model.loading = set()
                await asyncio.shield(asyncio.gather(*(pool.stop() for pool in fresh.values())))
                raise
            model.loading = set()
            failures = {
                version: pool.last_error or "no worker became ready"
                for (version, pool), ok in zip(fresh.items(), ready, strict=True)
                if not ok
            }
            if failures:
                await asyncio.gather(*(pool.stop() for pool in fresh.values()))
                return self._failed(model, failures)
            retired = [pool for version, pool in model.pools.items() if keep.get(version) is not pool]
            model.pools = {**keep, **fresh}
            model.config, model.digest, model.failed = config, entry.digest, {}
            self._metrics.reloads.labels(model.name, "ok").inc()
            log.info(
                "model.ready",
                extra=fields(model=model.name, versions=sorted(model.pools, key=int), retired=len(retired)),
            )
            for pool in retired:
                self._drain(model, pool)
            self._changed()
            return True

    def _failed(self, model: LoadedModel, failures: dict[str, str]) -> bool:
        model.failed = failures
        self._metrics.reloads.labels(model.name, "failed").inc()
        log.warning(
            "model.load_failed",
            extra=fields(model=model.name, failures=failures, still_serving=sorted(model.pools, key=int)),
        )
        self._changed()
        return False

    def _drain(self, model: LoadedModel, pool: WorkerPool) -> None:
        """Let ``pool`` finish what it accepted, then stop it (in the background)."""
        model.draining.append(pool)

        async def drain() -> None:
            await pool.drain()
            with contextlib.suppress(ValueError):
                model.draining.remove(pool)
            log.info("model.version_retired", extra=fields(model=model.name, version=pool.model_version))
            self._changed()

        task = asyncio.get_running_loop().create_task(drain())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def unload(self, name: str, *, missing_ok: bool = False) -> None:
        """Stop serving ``name``: new requests get NOT_FOUND, accepted ones finish first."""
        model = self._models.pop(name, None)
        if model is None:
            if missing_ok:
                return
            raise NotFound(f"model {name} is not loaded", reason=reasons.MODEL_NOT_FOUND)
        self._changed()
        async with model.lock:
            pools = [*model.pools.values(), *model.draining]
            model.pools = {}
            await asyncio.gather(*(pool.drain() for pool in pools))
        if name not in self._models:  # not loaded again meanwhile
            self.statistics.forget(name)
        log.info("model.unloaded", extra=fields(model=name))
        self._changed()

    async def close(self) -> None:
        for task in list(self._drains):
            task.cancel()
        pools = [pool for model in self._models.values() for pool in (*model.pools.values(), *model.draining)]
        self._models.clear()
        await asyncio.gather(*(pool.stop() for pool in pools), return_exceptions=True)
        ipc.sweep_segments(self._shm_prefix)

    # -- state ----------------------------------------------------------------------------

    def worker_counts(self) -> dict[tuple[str, str], int]:
        """Workers by (model, state), every state of every loaded model (zeros included)."""
        counts: dict[tuple[str, str], int] = {}
        for model in list(self._models.values()):
            for state in WorkerState:
                counts[(model.name, state.value)] = 0
            for pool in model.pools.values():
                for state, count in pool.states().items():
                    counts[(model.name, state.value)] += count
        return counts

    def _changed(self) -> None:
        ready = self.ready
        if ready != self._ready:
            self._ready = ready
            log.info("inference.readiness", extra=fields(ready=ready))
            self._on_readiness(ready)

    @property
    def ready(self) -> bool:
        """Loading has run, no model waits for its first version, and every serving version has a ready worker."""

        def serving(model: LoadedModel) -> bool:
            if not model.pools:
                return not model.loading  # a model that failed to load is not "loaded"
            return all(pool.ready_workers > 0 for pool in model.pools.values())

        return self._scanned and all(serving(model) for model in self._models.values())

    # -- requests -------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> tuple[LoadedModel, WorkerPool]:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served", reason=reasons.MODEL_NOT_FOUND)
        if not model.pools:
            if model.loading:
                raise Unavailable(f"model {name} is loading", retry_after_seconds=1)
            reason = next(iter(model.failed.values()), "it has no served version")
            raise Unavailable(f"model {name} is unavailable: {reason}")
        if not version:
            version = model.newest()
        pool = model.pools.get(version)
        if pool is None:
            raise NotFound(f"model {name!r} has no served version {version!r}", reason=reasons.VERSION_NOT_FOUND)
        return model, pool

    @staticmethod
    def config(model: LoadedModel) -> ModelConfig:
        if model.config is None:  # resolve() only hands out models with pools, which have a config
            raise Unavailable(f"model {model.name} has no valid configuration")
        return model.config

    def model(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served", reason=reasons.MODEL_NOT_FOUND)
        return model

    def model_ready(self, name: str, version: str = "") -> bool:
        with contextlib.suppress(NotFound, Unavailable):
            _, pool = self.resolve(name, version)
            return pool.ready_workers > 0
        return False

    async def infer(
        self,
        pool: WorkerPool,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        *,
        deadline: float,
        traceparent: str,
        timer: RequestTimer | None = None,
    ) -> ipc.InferResult:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await pool.infer(inputs, outputs, deadline=deadline, traceparent=traceparent, timer=timer)
            outcome = "ok"
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"  # the caller went away (or its deadline ran out)
            raise
        except Exception as error:
            outcome = {
                "DeadlineExceeded": "timeout",
                "Unavailable": "unavailable",
                "ResourceExhausted": "rejected",
                "InvalidArgument": "invalid",
            }.get(type(error).__name__, "error")
            raise
        finally:
            counter, seconds = pool.request_series(outcome)
            counter.inc()
            seconds.observe(time.perf_counter() - started)

    # -- views ----------------------------------------------------------------------------

    def index(self) -> list[IndexEntry]:
        entries = []
        for model in sorted(self._models.values(), key=lambda m: m.name):
            rows: list[IndexEntry] = []
            for version, pool in model.pools.items():
                if pool.ready_workers:
                    rows.append(IndexEntry(model.name, version, ModelState.READY, ""))
                else:
                    reason = pool.last_error or "no ready worker"
                    rows.append(IndexEntry(model.name, version, ModelState.UNAVAILABLE, reason))
            rows += [IndexEntry(model.name, v, ModelState.LOADING, "") for v in model.loading]
            rows += [IndexEntry(model.name, pool.model_version, ModelState.UNLOADING, "") for pool in model.draining]
            rows += [
                IndexEntry(model.name, version, ModelState.UNAVAILABLE, reason)
                for version, reason in model.failed.items()
            ]
            entries += sorted(rows, key=lambda row: (int(row.version or 0), row.state))
        return entries

    def model_statistics(self, name: str = "", version: str = "") -> list[VersionStatistics]:
        """Statistics of the served versions of ``name`` (empty: every model), or of one ``version``."""
        models = [self.model(name)] if name else sorted(self._models.values(), key=lambda m: m.name)
        rows = []
        for model in models:
            versions = sorted(model.pools, key=int)
            if version:
                if version not in model.pools:
                    raise NotFound(
                        f"model {model.name!r} has no served version {version!r}", reason=reasons.VERSION_NOT_FOUND
                    )
                versions = [version]
            rows += [self.statistics.get(model.name, served) for served in versions]
        return rows

    def repository_names(self) -> list[str]:
        return sorted(self._models)

    def health(self, model_name: str = "") -> list[WorkerHealth]:
        views: list[WorkerHealth] = []
        for model in self._models.values():
            if model_name and model.name != model_name:
                continue
            for pool in model.pools.values():
                views.extend(pool.health())
        return views

    async def restart_worker(self, worker_id: str) -> WorkerHealth:
        for model in self._models.values():
            for pool in model.pools.values():
                if await pool.restart(worker_id):
                    return next(view for view in pool.health() if view.worker_id == worker_id)
        raise NotFound(f"no worker {clip(worker_id)!r}", reason=reasons.WORKER_NOT_FOUND)
