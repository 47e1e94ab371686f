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
from services.inference import ipc
from services.inference.metrics import InferenceMetrics
from services.inference.pool import PoolSettings, WorkerHealth, WorkerPool, WorkerState
from services.inference.repository import ModelConfig, ModelEntry, scan

log = logging.getLogger(__name__)


class ModelState:
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig | None
    path: Path
    pools: dict[str, WorkerPool] = field(default_factory=dict)  # by version
    state: str = ModelState.LOADING
    reason: str = ""

    def newest(self) -> str:
        return max(self.pools, key=int)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class ModelManager:
    def __init__(
        self,
        *,
        repository: Path,
        pool_settings: PoolSettings,
        metrics: InferenceMetrics,
        on_readiness: Callable[[bool], None] = lambda ready: None,
        start_timeout: float = 120.0,
    ):
        self._repository = repository
        self._pool_settings = pool_settings
        self._metrics = metrics
        self._on_readiness = on_readiness
        self._start_timeout = start_timeout
        self._models: dict[str, LoadedModel] = {}
        self._shm_prefix = f"mlp-{os.getpid()}-"
        self._ready = False
        self._scanned = False

    # -- loading --------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model of the repository (broken ones are reported, not fatal)."""
        entries = await asyncio.to_thread(scan, self._repository)
        self._scanned = True
        log.info("repository.scanned", extra=fields(path=str(self._repository), models=sorted(entries)))
        await asyncio.gather(*(self._load_entry(entry) for entry in entries.values()))
        self._changed()

    async def load(self, name: str) -> None:
        """(Re)load one model from the repository: RepositoryModelLoad."""
        entries = await asyncio.to_thread(scan, self._repository)
        entry = entries.get(name)
        if entry is None:
            raise NotFound(f"model {name} is not in the repository", reason="MODEL_NOT_FOUND")
        await self.unload(name, missing_ok=True)
        await self._load_entry(entry)
        model = self._models[name]
        if model.state != ModelState.READY:
            raise Unavailable(f"model {name} failed to load: {model.reason}")

    async def _load_entry(self, entry: ModelEntry) -> None:
        model = LoadedModel(entry.name, entry.config, entry.path)
        self._models[entry.name] = model
        if entry.config is None or entry.error:
            model.state, model.reason = ModelState.UNAVAILABLE, entry.error or "invalid configuration"
            log.warning("model.unavailable", extra=fields(model=entry.name, reason=model.reason))
            self._changed()
            return
        for version in entry.versions:
            pool = WorkerPool(
                model_name=entry.name,
                model_version=str(version),
                model_dir=entry.path,
                workers=entry.config.min_workers,
                settings=self._pool_settings,
                metrics=self._metrics,
                shm_prefix=self._shm_prefix,
                on_change=self._changed,
            )
            model.pools[str(version)] = pool
            pool.start()
        self._changed()
        ready = await asyncio.gather(*(pool.wait_ready(self._start_timeout) for pool in model.pools.values()))
        if all(ready):
            model.state = ModelState.READY
            log.info("model.ready", extra=fields(model=entry.name, versions=sorted(model.pools, key=int)))
        else:
            errors = [pool.last_error for pool in model.pools.values() if pool.last_error]
            model.state = ModelState.UNAVAILABLE
            model.reason = errors[0] if errors else "no worker became ready"
            log.warning("model.unavailable", extra=fields(model=entry.name, reason=model.reason))
            await asyncio.gather(*(pool.stop() for pool in model.pools.values()))
            model.pools.clear()
        self._changed()

    async def unload(self, name: str, *, missing_ok: bool = False) -> None:
        model = self._models.get(name)
        if model is None:
            if missing_ok:
                return
            raise NotFound(f"model {name} is not loaded", reason="MODEL_NOT_FOUND")
        model.state = ModelState.UNLOADING
        self._changed()
        await asyncio.gather(*(pool.stop() for pool in model.pools.values()))
        del self._models[name]
        log.info("model.unloaded", extra=fields(model=name))
        self._changed()

    async def close(self) -> None:
        await asyncio.gather(*(self.unload(name, missing_ok=True) for name in list(self._models)))
        ipc.sweep_segments(self._shm_prefix)

    # -- state ----------------------------------------------------------------------------

    def _changed(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for model in self._models.values():
            for state in WorkerState:
                counts[(model.name, state.value)] = 0
            for pool in model.pools.values():
                for state, count in pool.states().items():
                    counts[(model.name, state.value)] += count
        for (name, state_name), count in counts.items():
            self._metrics.workers.labels(name, state_name).set(count)
        ready = self.ready
        if ready != self._ready:
            self._ready = ready
            log.info("inference.readiness", extra=fields(ready=ready))
            self._on_readiness(ready)

    @property
    def ready(self) -> bool:
        """Loading has run, and every loaded model has a ready worker in each served version."""
        return self._scanned and all(
            pool.ready_workers > 0 for model in self._models.values() for pool in model.pools.values()
        )

    # -- requests -------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> tuple[LoadedModel, WorkerPool]:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served", reason="MODEL_NOT_FOUND")
        if not model.pools:
            if model.state == ModelState.UNAVAILABLE:
                raise Unavailable(f"model {name} is unavailable: {model.reason}")
            raise Unavailable(f"model {name} is {model.state.lower()}", retry_after_seconds=1)
        if not version:
            version = model.newest()
        pool = model.pools.get(version)
        if pool is None:
            raise NotFound(f"model {name!r} has no served version {version!r}", reason="VERSION_NOT_FOUND")
        return model, pool

    @staticmethod
    def config(model: LoadedModel) -> ModelConfig:
        if model.config is None:  # resolve() only hands out models with pools, which have a config
            raise Unavailable(f"model {model.name} has no valid configuration")
        return model.config

    def model(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served", reason="MODEL_NOT_FOUND")
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
    ) -> ipc.InferResult:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await pool.infer(inputs, outputs, deadline=deadline, traceparent=traceparent)
            outcome = "ok"
            return result
        except Exception as error:
            outcome = {
                "DeadlineExceeded": "timeout",
                "Unavailable": "unavailable",
                "ResourceExhausted": "rejected",
                "InvalidArgument": "invalid",
            }.get(type(error).__name__, "error")
            raise
        finally:
            self._metrics.requests.labels(pool.model_name, pool.model_version, outcome).inc()
            self._metrics.request_seconds.labels(pool.model_name).observe(time.perf_counter() - started)

    # -- views ----------------------------------------------------------------------------

    def index(self) -> list[IndexEntry]:
        entries = []
        for model in sorted(self._models.values(), key=lambda m: m.name):
            if not model.pools:
                entries.append(IndexEntry(model.name, "", model.state, model.reason))
            for version, pool in sorted(model.pools.items(), key=lambda item: int(item[0])):
                state = ModelState.READY if pool.ready_workers else model.state
                if state == ModelState.READY and not pool.ready_workers:
                    state = ModelState.UNAVAILABLE
                entries.append(IndexEntry(model.name, version, state, "" if pool.ready_workers else pool.last_error))
        return entries

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
        raise NotFound(f"no worker {worker_id!r}", reason="WORKER_NOT_FOUND")
