"""The audit commands of `tollgate`: the checkpoint signing key and the verification of the ledger.

tollgate audit public-key            the key that signs ledger.checkpoints (from the admin API)
tollgate audit verify [--tenant T]   every link, Merkle root and signature in Postgres and on the topics,
                                     then a re-fold of ledger.events; the first divergence of each
                                     tenant (tenant, sequence, field) and exit 1, or exit 0
"""

from __future__ import annotations

import asyncio
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tollgate.cli import AdminToken, Url, _admin, _show, app
from tollgate.operating_errors import operating_errors

admin_app = typer.Typer(help="Admin credentials and their roles (admin API).", no_args_is_help=True)
credentials_app = typer.Typer(help="Named admin credentials: operator or finance.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
admin_app.add_typer(credentials_app, name="credentials")
audit_app = typer.Typer(
    help="Audit: the entries' hash chain and its signed checkpoints.", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")


@audit_app.command("public-key")
def public_key(url: Url = None, admin_token: AdminToken = None) -> None:
    """Print the Ed25519 key that signs the ledger's checkpoints (hex, PEM and its key id)."""
    with _admin(url, admin_token) as client:
        _show(client.get("/admin/v1/audit/public-key"))


class Role(StrEnum):
    operator = "operator"
    finance = "finance"


@credentials_app.command("create")
def credentials_create(
    name: str,
    role: Annotated[Role, typer.Option(help="operator: every admin action; finance: read-only.")],
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """Create a named credential; its secret is printed once (present it as the admin bearer token)."""
    with _admin(url, admin_token) as client:
        _show(client.post("/admin/v1/credentials", json={"name": name, "role": role.value}))


@credentials_app.command("revoke")
def credentials_revoke(name: str, url: Url = None, admin_token: AdminToken = None) -> None:
    """Revoke a named credential: refused from the next request on."""
    with _admin(url, admin_token) as client:
        _show(client.post(f"/admin/v1/credentials/{name}/revoke"))


@credentials_app.command("list")
def credentials_list(url: Url = None, admin_token: AdminToken = None) -> None:
    """The named credentials, their roles, and when they were created and revoked."""
    with _admin(url, admin_token) as client:
        _show(client.get("/admin/v1/credentials"))


@audit_app.command("log")
def audit_log(
    since: Annotated[int, typer.Option(help="Rows after this sequence.")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 100,
    url: Url = None,
    admin_token: AdminToken = None,
) -> None:
    """The admin audit log: who did what, when, with which request id and resulting event ids."""
    with _admin(url, admin_token) as client:
        _show(client.get("/admin/v1/audit/log", params={"since": since, "limit": limit}))


def _load_public_key(text: str | None):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from streams.audit_checkpoints import AuditSettings, load_signing_key

    if text is None:
        return load_signing_key(AuditSettings().signing_key_path).public_key()
    if Path(text).is_file():
        return load_pem_public_key(Path(text).read_bytes())
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


async def _verify(tenants: set[str] | None, key, on_progress):
    from storage.database import (
        DatabaseSettings,
        build_async_engine,
        build_session_factory,
        resolve_database_url,
    )
    from streams.audit_verify import verify
    from streams.log import KafkaLog
    from streams.settings import StreamSettings

    database = DatabaseSettings()
    engine = build_async_engine(resolve_database_url(database), database)
    log = KafkaLog(StreamSettings())
    await log.start()
    try:
        return await verify(log, build_session_factory(engine), key, tenants, on_progress)
    finally:
        await log.stop()
        await engine.dispose()


@audit_app.command("verify")
def audit_verify(
    tenant: Annotated[list[str] | None, typer.Option(help="Only this tenant (repeatable).")] = None,
    public_key: Annotated[
        str | None,
        typer.Option(
            help="The signing key (64 hex chars or a PEM file); default: TOLLGATE_AUDIT_SIGNING_KEY_PATH."
        ),
    ] = None,
) -> None:
    """Verify the hash chains, checkpoints and entries against Postgres, the topics and a re-fold."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    key = _load_public_key(public_key)
    with Progress(
        TextColumn("verifying the ledger"),
        BarColumn(),
        TextColumn("{task.completed} entries"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("verify", total=None)
        with operating_errors("audit verify"):
            report = asyncio.run(
                _verify(set(tenant) if tenant else None, key, lambda n: progress.advance(task, n))
            )
    summary = (
        f"{report.tenants} tenants, {report.entries} entries, {report.checkpoints} checkpoints, "
        f"{report.admin_actions} admin actions"
    )
    if report.ok:
        console.print(f"verified {summary}: no divergence")
        return
    for divergence in report.divergences:
        console.print(f"DIVERGENCE {divergence}", markup=False)
    console.print(f"{len(report.divergences)} of {report.tenants} tenants diverge ({summary})")
    raise typer.Exit(1)
