"""The pipeline's three stages, which share nothing but the store (`bridge.store`).

Data flows one way:

- intake (`bridge.stages.intake`): `POST /webhooks/{source}` verifies the raw bytes and
  appends the delivery to the inbox, then answers;
- translate (`bridge.stages.translate`): the inbox, in arrival order, through each
  delivery's handler into outbox calls (or quarantine);
- forward (`bridge.stages.forward`): the outbox, sent to Millimetric in batches, within
  its rate limits: delivered, retried or dead-lettered.

The relay (`bridge.stages.relay`) takes the user's own servers' calls on Millimetric's API
(`/v1/*`) as intake takes webhooks: checked, then appended to the inbox as deliveries of
source `relay`, which the translate stage turns into calls with the relay's own handler
(`bridge.stages.relay_handler`). Only its forget is carried out before the answer, as the
operator's is (`Store.accept`).
"""
