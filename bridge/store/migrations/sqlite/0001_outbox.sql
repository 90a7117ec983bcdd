-- The inbox records every verified delivery (for redelivery detection and re-verification);
-- the outbox holds the calls to send, one row each.
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    provider_event_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    raw_body BLOB,            -- NULL once retention or a forget has dropped it
    headers BLOB,             -- JSON: the headers needed to verify it again
    calls INTEGER NOT NULL,   -- how many calls it became; 0: knowingly ignored
    UNIQUE (source, provider_event_id)
);
CREATE INDEX inbox_received ON inbox (received_at);

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    inbox_id INTEGER,
    route TEXT NOT NULL,                     -- track | identify | forget
    state TEXT NOT NULL DEFAULT 'pending',   -- pending | delivered | dead
    subject TEXT,                            -- hash of the user it is about
    event_id TEXT,
    body BLOB NOT NULL,                      -- the call as compact JSON, as sent
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,                   -- due time; a claim moves it by the lease
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed INTEGER NOT NULL DEFAULT 0,
    done_at REAL,
    reason TEXT
);
CREATE INDEX outbox_due ON outbox (route, next_at, id) WHERE state = 'pending';
CREATE INDEX outbox_pending ON outbox (id) WHERE state = 'pending';
CREATE INDEX outbox_subject ON outbox (subject) WHERE subject IS NOT NULL;
CREATE INDEX outbox_done ON outbox (state, done_at) WHERE state != 'pending';
CREATE INDEX outbox_inbox ON outbox (inbox_id);

-- Hashes of forgotten users: nothing about them is stored or sent again.
CREATE TABLE forgotten (subject TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;

CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
