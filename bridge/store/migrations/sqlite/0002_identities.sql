-- What the bridge has learned about who an anonymous id belongs to: put on later calls,
-- sent to Millimetric once as identify, erased by forget.
CREATE TABLE identities (
    anonymous_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    subject TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX identities_subject ON identities (subject);
