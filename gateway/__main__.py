"""`python -m gateway`: the gateway on uvicorn, everything from the environment.

TOLLGATE_GATEWAY_* (gateway.settings), TOLLGATE_ADMISSION_* (admission), TOLLGATE_INTERNAL_TOKEN (the
secret the workers require: the gateway refuses to start without it), TOLLGATE_* / DATABASE_URL (the
database and the event log). Start-up: wait for and migrate the database, open the event log (Kafka, or
the embedded Postgres log), build admission (its balance view tails the log), then serve until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn
import uvloop

from gateway.admin import AdminSettings
from gateway.app import create_app
from gateway.listener import listening_socket
from gateway.logs import configure_logging
from gateway.settings import GatewaySettings
from inference.internal_auth import InternalAuthSettings
from storage.database import DatabaseSettings, build_async_engine, build_session_factory, prepare_database
from streams.settings import StreamSettings

logger = logging.getLogger("gateway")


def open_event_log(settings: GatewaySettings, stream_settings: StreamSettings, engine):
    if settings.event_log == "embedded":
        from streams.embedded_log import PostgresLog

        return PostgresLog(engine, stream_settings)
    from streams.log import KafkaLog

    return KafkaLog(stream_settings)


async def start_gateway(settings: GatewaySettings, event_log, engine, sessions, *, internal_token: str):
    """The gateway app over a started event log, with admission (its balance view tailing that log)
    started and its metrics in the gateway's registry; `internal_token` goes to the workers with every
    call. Returns (app, admission runtime to stop)."""
    from gateway.admission.factory import AdmissionRuntime
    from gateway.admission.metrics import AdmissionMetrics
    from gateway.admission.settings import AdmissionSettings

    admission_metrics = AdmissionMetrics(registry=None)  # served by the gateway's own registry
    admission_runtime = AdmissionRuntime.create(
        event_log, AdmissionSettings(), engine=engine, metrics=admission_metrics
    )
    await admission_runtime.start()
    app = create_app(
        settings,
        internal_token=internal_token,
        log=event_log,
        admission=admission_runtime.admission,
        session_factory=sessions,
        collectors=admission_metrics.collectors(),
        admin_settings=AdminSettings(admin_token=settings.admin_token) if settings.admin_token else None,
    )
    return app, admission_runtime


async def serve(settings: GatewaySettings, internal_token: str) -> None:
    database_settings = DatabaseSettings()
    database_url = await asyncio.to_thread(prepare_database, database_settings)
    engine = build_async_engine(database_url, database_settings)
    sessions = build_session_factory(engine)
    event_log = open_event_log(settings, StreamSettings(), engine)
    await event_log.start()
    app, admission_runtime = await start_gateway(
        settings, event_log, engine, sessions, internal_token=internal_token
    )
    try:
        listener = listening_socket(settings.host, settings.port, reuse_port=settings.reuse_port)
        config = uvicorn.Config(
            app,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_config=None,  # our JSON logging stays in charge
            lifespan="on",
        )
        logger.info(
            "gateway listening on %s:%d, workers %s", settings.host, settings.port, settings.worker_urls
        )
        await uvicorn.Server(config).serve(sockets=[listener])
    finally:
        await admission_runtime.stop()
        await event_log.stop()
        await engine.dispose()


def main() -> None:
    settings = GatewaySettings()
    configure_logging()  # TOLLGATE_LOG_LEVEL and TOLLGATE_LOG_FORMAT, as every component
    internal_token = (
        InternalAuthSettings().required_token()
    )  # raises, naming TOLLGATE_INTERNAL_TOKEN, without one
    uvloop.run(
        serve(settings, internal_token)
    )  # uvicorn's loop="uvloop" applies only to uvicorn.run, not to Server.serve


if __name__ == "__main__":
    main()
