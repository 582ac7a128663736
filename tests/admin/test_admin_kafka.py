"""The admin API end to end over the real producer and broker: grant and void through the API, the
events reach ledger.events through EventProducer, the projector archives them, the balance sees them."""

import pytest

from ledger.events import UsageRecorded
from streams.producer import EventProducer
from streams.projector import Projector, ProjectorSettings
from streams.settings import StreamSettings
from streams.topics import LedgerTopics, ensure_topics, ledger_topic_specs
from tests.storage.dead_letters import RecordingDeadLetters

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

STEPS_MAX = 100  # bound on the projector loop; 3 records need one or two steps


@pytest.fixture
def stream_settings(kafka_broker, topic_prefix, tmp_path) -> StreamSettings:
    return StreamSettings(
        kafka_bootstrap_servers=kafka_broker.bootstrap,
        topic_prefix=topic_prefix,
        topic_partitions=2,
        spool_path=tmp_path / "spool.sqlite3",
    )


@pytest.fixture
async def publisher(stream_settings):
    """The real EventProducer in place of the recording publisher (the admin_app fixture takes this)."""
    await ensure_topics(stream_settings.kafka_bootstrap_servers, ledger_topic_specs(stream_settings))
    async with EventProducer(stream_settings) as producer:
        yield producer


async def project_until(projector: Projector, records_wanted: int) -> None:
    for _ in range(STEPS_MAX):
        if projector.records_projected >= records_wanted:
            return
        await projector.step()
    raise AssertionError(f"projected {projector.records_projected} of {records_wanted} records")


async def test_grant_and_void_reach_the_balance_through_broker_and_projector(
    client, tenant_id, publisher, stream_settings, session_factory, clock
):
    start = clock.now_ms
    kept = await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants",
        json={"amount": 500, "effective_at": start, "expires_at": start + 10_000},
        headers={"Idempotency-Key": "kept"},
    )
    replay = await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants",
        json={"amount": 500, "effective_at": start, "expires_at": start + 10_000},
        headers={"Idempotency-Key": "kept"},
    )
    voided = await client.post(
        f"/admin/v1/tenants/{tenant_id}/grants", json={"amount": 200}, headers={"Idempotency-Key": "voided"}
    )
    await publisher.publish(
        UsageRecorded(
            event_id="req-1", tenant_id=tenant_id, amount=120, occurred_at=start + 1_000, model="tiny"
        )
    )
    clock.now_ms = start + 2_000
    void = await client.post(f"/admin/v1/grants/{voided.json()['grant_id']}/void")
    assert [kept.status_code, replay.status_code, voided.status_code, void.status_code] == [
        201,
        201,
        201,
        200,
    ]

    projector = Projector(
        settings=ProjectorSettings(name="admin-e2e", poll_timeout_ms=200),
        topics=LedgerTopics.from_settings(stream_settings),
        bootstrap_servers=stream_settings.kafka_bootstrap_servers,
        session_factory=session_factory,
        dead_letter_log=RecordingDeadLetters(),
    )
    async with projector:
        await project_until(projector, 4)  # two grants, one usage, one void: the replay sent nothing
        assert await projector.step() == 0

    async def balance(at: int) -> dict:
        return (await client.get(f"/admin/v1/tenants/{tenant_id}/balance", params={"at": at})).json()

    # usage 120 draws first from the block that expires (priority equal, soonest expiry first)
    assert (await balance(start + 1_500))["balance"] == 500 + 200 - 120
    after_void = await balance(start + 2_000)
    assert after_void["balance"] == 380
    assert [(b["grant_id"], b["remaining"]) for b in after_void["blocks"]] == [(kept.json()["grant_id"], 380)]
    assert (await balance(start + 10_000))["balance"] == 0
