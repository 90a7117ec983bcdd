-- As the SQLite backend's migration 0005: each delivery's place in the pipeline, and one
-- outbox row per event_id.
ALTER TABLE inbox ADD COLUMN state TEXT NOT NULL DEFAULT 'translated';
ALTER TABLE inbox ADD COLUMN reason TEXT;
CREATE INDEX inbox_untranslated ON inbox (id) WHERE state = 'untranslated';
CREATE INDEX inbox_quarantined ON inbox (id) WHERE state = 'quarantined';

DELETE FROM outbox WHERE event_id IS NOT NULL AND id NOT IN
    (SELECT MIN(id) FROM outbox WHERE event_id IS NOT NULL GROUP BY event_id);
CREATE UNIQUE INDEX outbox_event ON outbox (event_id) WHERE event_id IS NOT NULL;
