"""Prometheus metrics of the proxy (served by GrpcService on /metrics).

Generic RPC counts and latencies come from cms.runtime.server; these add what
only the proxy knows: operations by outcome, batch sizes, the worker pool, the
backend and live handles.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OPERATION_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1, 2.5, 5, 10, 30)

OPERATIONS = Counter(
    "cms_hsm_operations", "HSM operations (RPCs) completed, by operation and status code",
    ["operation", "code"])
ERRORS = Counter(
    "cms_hsm_operation_errors", "HSM operations that failed, by operation and status code",
    ["operation", "code"])
DENIED = Counter(
    "cms_hsm_policy_denials", "Requests denied by the policy, by identity and operation",
    ["identity", "operation"])
LATENCY = Histogram(
    "cms_hsm_operation_seconds", "Time to serve an HSM operation, policy and audit included",
    ["operation"], buckets=OPERATION_BUCKETS)
BATCH_ITEMS = Counter(
    "cms_hsm_batch_items", "Items processed by batch operations", ["operation"])
WORKER_SECONDS = Histogram(
    "cms_hsm_worker_call_seconds",
    "Time from sending work to a worker process to its reply, by worker operation",
    ["operation"], buckets=OPERATION_BUCKETS)

WORKERS_CONFIGURED = Gauge("cms_hsm_workers_configured", "PKCS#11 worker processes configured")
WORKERS_UP = Gauge("cms_hsm_workers_up", "Worker processes alive with a working backend")
WORKERS_ALIVE = Gauge("cms_hsm_workers_alive", "Worker processes alive (backend up or not)")
SESSIONS = Gauge("cms_hsm_sessions_in_use", "Open PKCS#11 sessions across the workers")
WORKER_STATES = Gauge("cms_hsm_worker_states", "Channel and key set states held in the workers "
                      "(each holds session keys or derived key objects until released)")
HANDLES = Gauge("cms_hsm_handles_live", "Live handles (session keys and other worker state)",
                ["kind"])
BACKEND_FAILURES = Counter(
    "cms_hsm_backend_resets", "Times a worker's backend went down (failure or restart)",
    ["worker"])
WORKER_RESTARTS = Counter(
    "cms_hsm_worker_restarts", "Worker processes restarted after a crash or hang", ["worker"])
AUDIT_RECORDS = Counter("cms_hsm_audit_records", "Audit records written", ["outcome"])
