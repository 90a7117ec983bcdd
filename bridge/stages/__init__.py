"""The pipeline's three stages, which share nothing but the store (`bridge.store`).

Data flows one way:

- intake (`bridge.stages.intake`): `POST /webhooks/{source}` verifies the raw bytes and
  appends the delivery to the inbox, then answers;
- translate (`bridge.stages.translate`): the inbox, in arrival order, through each
  delivery's handler into outbox calls (or quarantine);
- forward (`bridge.stages.forward`): the outbox, sent to Millimetric in batches, within
  its rate limits: delivered, retried or dead-lettered.

The relay (`bridge.stages.relay`) takes the user's own servers' calls on Millimetric's API
(`/v1/*`) and stores them in the outbox with `Store.accept`, as the operator's forget is;
the forward stage sends them with the rest.
"""
