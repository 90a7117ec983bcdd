-- Intake stores the verified delivery and answers; the translate stage runs its handler
-- after. `state` says where each delivery is: untranslated (waiting for the stage),
-- translated (its calls are in the outbox), quarantined (its handler could not translate
-- it: `reason` says why; its raw body is kept until it is retranslated or purged) or
-- dropped (a quarantined delivery purged by the operator). Deliveries stored before this
-- migration were translated on the request path.
ALTER TABLE inbox ADD COLUMN state TEXT NOT NULL DEFAULT 'translated';
ALTER TABLE inbox ADD COLUMN reason TEXT;
CREATE INDEX inbox_untranslated ON inbox (id) WHERE state = 'untranslated';
CREATE INDEX inbox_quarantined ON inbox (id) WHERE state = 'quarantined';

-- The bridge never queues one event_id twice: a call already pending, in flight or
-- delivered (until retention drops it) is not queued again, however many deliveries or
-- retranslations name it. Copies queued before this migration keep their first row.
DELETE FROM outbox WHERE event_id IS NOT NULL AND id NOT IN
    (SELECT MIN(id) FROM outbox WHERE event_id IS NOT NULL GROUP BY event_id);
CREATE UNIQUE INDEX outbox_event ON outbox (event_id) WHERE event_id IS NOT NULL;
