"""The pipeline's three stages, which share nothing but the store (`bridge.store`).

Data flows one way:

- intake (`bridge.stages.intake`): `POST /webhooks/{source}` verifies the raw bytes and
  appends the delivery to the inbox, then answers;
- translate (`bridge.stages.translate`): the inbox, in arrival order, through each
  delivery's handler into outbox calls (or quarantine);
- forward (`bridge.stages.forward`): the outbox, sent to Millimetric in batches, within
  its rate limits: delivered, retried or dead-lettered.
"""
