-- As the SQLite backend's migration 0004: who each delivery is about, as hashes, for
-- erasure; deliveries stored before it are linked to the users of their calls.
CREATE TABLE inbox_subjects (
    subject TEXT NOT NULL,
    inbox_id BIGINT NOT NULL REFERENCES inbox (id) ON DELETE CASCADE,
    PRIMARY KEY (subject, inbox_id)
);
CREATE INDEX inbox_subjects_inbox ON inbox_subjects (inbox_id);
INSERT INTO inbox_subjects (subject, inbox_id)
    SELECT DISTINCT subject, inbox_id FROM outbox
    WHERE subject IS NOT NULL AND inbox_id IS NOT NULL
      AND inbox_id IN (SELECT id FROM inbox);

ALTER TABLE outbox ADD COLUMN visitor TEXT;
CREATE INDEX outbox_visitor ON outbox (visitor) WHERE visitor IS NOT NULL;
