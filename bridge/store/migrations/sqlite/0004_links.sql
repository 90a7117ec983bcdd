-- Who each delivery is about (hashes of the users, visitors and declared identifiers its
-- calls name): erasure finds a user's deliveries through these links, never by searching
-- bodies. Deliveries stored before this migration are linked to the users of their calls.
CREATE TABLE inbox_subjects (
    subject TEXT NOT NULL,
    inbox_id INTEGER NOT NULL,
    PRIMARY KEY (subject, inbox_id)
) WITHOUT ROWID;
CREATE INDEX inbox_subjects_inbox ON inbox_subjects (inbox_id);
INSERT OR IGNORE INTO inbox_subjects (subject, inbox_id)
    SELECT subject, inbox_id FROM outbox WHERE subject IS NOT NULL AND inbox_id IS NOT NULL;
CREATE TRIGGER inbox_subjects_gone AFTER DELETE ON inbox BEGIN
    DELETE FROM inbox_subjects WHERE inbox_id = old.id;
END;

-- The visitor (hash of the anonymous id) a call is about: a forget of the user learned
-- for that visitor reaches the call even when it names no user.
ALTER TABLE outbox ADD COLUMN visitor TEXT;
CREATE INDEX outbox_visitor ON outbox (visitor) WHERE visitor IS NOT NULL;
