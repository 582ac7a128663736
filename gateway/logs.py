"""The gateway's request context for log lines (request id, tenant id, model), which the routes set.

The formatter and the one setup function live in `tollgate.logging_setup` (every component logs the same
way); the names are re-exported here for the gateway's modules.
"""

from tollgate.logging_setup import JsonFormatter, configure_logging, model_var, request_id_var, tenant_id_var

__all__ = ["JsonFormatter", "configure_logging", "model_var", "request_id_var", "tenant_id_var"]
