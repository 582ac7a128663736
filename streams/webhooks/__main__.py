"""`python -m streams.webhooks`: the webhook dispatcher, its own process (settings from the environment)."""

from streams.webhooks.dispatcher import main

main()
