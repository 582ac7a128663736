"""The webhook dispatcher: delivers the alerts on `ledger.alerts` to tenants' endpoints (issue 16, point 2).

settings     WebhookSettings (TOLLGATE_WEBHOOK_*): the retry schedule and the named limits
message      an alert as a Standard Webhooks message: its body, its signed headers; the backoff
dispatcher   WebhookDispatcher: consume -> schedule (Postgres) -> claim due -> POST -> record
__main__     `python -m streams.webhooks`: the dispatcher over Kafka, its own process
"""
