"""Issue 13's drift: `tollgate tenants create --tier standard` answered 422 while admission and the README
knew `standard`. The admin API accepts every shared tier and refuses the others."""

from __future__ import annotations

import pytest

from tollgate.common_settings import default_tiers


@pytest.mark.parametrize("tier", list(default_tiers()))
async def test_every_shared_tier_can_be_given_to_a_tenant(client, tier):
    response = await client.post("/admin/v1/tenants", json={"name": "Acme", "tier": tier})
    assert response.status_code == 201, response.text
    assert response.json()["tier"] == tier


async def test_standard_is_one_of_them(client):
    response = await client.post("/admin/v1/tenants", json={"name": "Acme", "tier": "standard"})
    assert response.status_code == 201, response.text
