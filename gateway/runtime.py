"""Everything the routes need, built once per app and kept on `app.state.runtime`."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.admission.base import Admission
from gateway.auth import TenantKeyCache
from gateway.completions import CompletionService
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.workers import WorkerPool


@dataclass
class GatewayRuntime:
    settings: GatewaySettings
    admission: Admission
    metrics: GatewayMetrics
    pool: WorkerPool
    key_cache: TenantKeyCache
    completions: CompletionService
