"""The proof route and the standalone verifier: a proof fetched from the admin API checks out offline
with scripts/verify_proof.py and the key from /admin/v1/audit/public-key; an altered entry, path or
checkpoint, or another key, fails with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.admin.audit import _public_key
from storage.database import build_async_engine, build_session_factory
from storage.tenants import Tenant
from streams.embedded_log import PostgresLog
from tests.audit.helpers import KEY, TENANTS, ledger_events, write_ledger
from tests.fixtures.admin_api import admin_api, admin_client
from tests.streams.helpers import stream_settings

ROOT = Path(__file__).resolve().parents[2]
VERIFIER = ROOT / "scripts" / "verify_proof.py"
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


@pytest.fixture
async def client(database_url, database_settings, topic_prefix, tmp_path, monkeypatch):
    key_path = tmp_path / "signing-key.pem"
    key_path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    monkeypatch.setenv("TOLLGATE_AUDIT_SIGNING_KEY_PATH", str(key_path))
    _public_key.cache_clear()
    engine = build_async_engine(database_url, database_settings)
    log = PostgresLog(engine, stream_settings("unused:9092", topic_prefix, tmp_path))
    await log.start()
    session_factory = build_session_factory(engine)
    await write_ledger(log, session_factory, ledger_events())
    async with session_factory() as session, session.begin():
        session.add_all(Tenant(tenant_id=t, name=t, tier="pro", created_at_ms=0) for t in TENANTS)
    async with admin_client(admin_api(session_factory, None, ADMIN_TOKEN), ADMIN_TOKEN) as client:
        yield client
    _public_key.cache_clear()
    await log.stop()
    await engine.dispose()


def run_verifier(proof: dict, public_key: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(proof))
    return subprocess.run(
        [sys.executable, str(VERIFIER), str(path), "--public-key", public_key],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_proof_checks_out_offline_and_any_alteration_fails(client, tmp_path):
    key = (await client.get("/admin/v1/audit/public-key")).json()
    assert key["algorithm"] == "Ed25519" and len(key["public_key"]) == 64
    response = await client.get("/admin/v1/tenants/acme/entries?since=0&limit=50")
    assert response.status_code == 200, response.text
    entries = response.json()["entries"]
    entry_id = next(e["entry_id"] for e in entries if e["type"] == "usage_allocated")
    response = await client.get(f"/admin/v1/tenants/acme/entries/{entry_id}/proof")
    assert response.status_code == 200, response.text
    proof = response.json()
    assert proof["entry_id"] == entry_id and proof["tree_size"] >= 1

    checked = run_verifier(proof, key["public_key"], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith(f"OK: entry {entry_id} is entry {proof['sequence']} of tenant acme")
    pem = tmp_path / "key.pem"
    pem.write_text(key["public_key_pem"])
    assert run_verifier(proof, str(pem), tmp_path).returncode == 0

    entry = json.loads(proof["entry"])
    altered = {
        **proof,
        "entry": proof["entry"].replace(f'"amount":{entry["amount"]}', f'"amount":{entry["amount"] + 1}', 1),
    }
    failed = run_verifier(altered, key["public_key"], tmp_path)
    assert failed.returncode == 1 and "the entry was altered" in failed.stdout
    if proof["audit_path"]:
        wrong_path = {**proof, "audit_path": ["00" * 32, *proof["audit_path"][1:]]}
        failed = run_verifier(wrong_path, key["public_key"], tmp_path)
        assert failed.returncode == 1 and "Merkle root" in failed.stdout
    forged = {**proof, "checkpoint": proof["checkpoint"].replace('"number":', '"number":1', 1)}
    failed = run_verifier(forged, key["public_key"], tmp_path)
    assert failed.returncode == 1 and "signature" in failed.stdout
    other = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    failed = run_verifier(proof, other.hex(), tmp_path)
    assert failed.returncode == 1 and "signature" in failed.stdout


async def test_every_entry_of_a_checkpointed_range_has_a_proof_and_others_are_refused(client, tmp_path):
    key = (await client.get("/admin/v1/audit/public-key")).json()["public_key"]
    entries = (await client.get("/admin/v1/tenants/globex/entries?since=0&limit=50")).json()["entries"]
    checked = 0
    for entry in entries:
        response = await client.get(f"/admin/v1/tenants/globex/entries/{entry['entry_id']}/proof")
        if response.status_code == 409:  # after the last checkpoint: not covered yet
            continue
        assert response.status_code == 200, response.text
        assert run_verifier(response.json(), key, tmp_path).returncode == 0
        checked += 1
    assert checked >= 8
    missing = await client.get("/admin/v1/tenants/globex/entries/globex/usage/nothing/proof")
    assert missing.status_code == 404
