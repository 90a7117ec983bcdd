-- The same tables as the SQLite backend's migrations 0001-0003, in PostgreSQL's types:
-- BYTEA bodies, DOUBLE PRECISION times (seconds since the epoch, as SQLite's REAL),
-- BIGINT identity ids. Ids and prefixes compare byte-wise (COLLATE "C"), as in SQLite,
-- so a prefix range means the same whatever the database's locale.

-- The inbox records every verified delivery (for redelivery detection and re-verification);
-- the outbox holds the calls to send, one row each.
CREATE TABLE inbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source TEXT COLLATE "C" NOT NULL,
    provider_event_id TEXT COLLATE "C" NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    raw_body BYTEA,           -- NULL once retention or a forget has dropped it
    headers BYTEA,            -- JSON: the headers needed to verify it again
    calls INTEGER NOT NULL,   -- how many calls it became; 0: knowingly ignored
    UNIQUE (source, provider_event_id)
);
CREATE INDEX inbox_received ON inbox (received_at);

CREATE TABLE outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    inbox_id BIGINT,
    route TEXT NOT NULL,                     -- track | identify | forget
    state TEXT NOT NULL DEFAULT 'pending',   -- pending | delivered | dead
    subject TEXT,                            -- hash of the user it is about
    event_id TEXT,
    body BYTEA NOT NULL,                     -- the call as compact JSON, as sent
    created_at DOUBLE PRECISION NOT NULL,
    next_at DOUBLE PRECISION NOT NULL,       -- due time; a claim moves it by the lease
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed BOOLEAN NOT NULL DEFAULT FALSE,
    done_at DOUBLE PRECISION,
    reason TEXT
);
CREATE INDEX outbox_due ON outbox (route, next_at, id) WHERE state = 'pending';
CREATE INDEX outbox_pending ON outbox (id) WHERE state = 'pending';
CREATE INDEX outbox_subject ON outbox (subject) WHERE subject IS NOT NULL;
CREATE INDEX outbox_done ON outbox (state, done_at) WHERE state != 'pending';
CREATE INDEX outbox_inbox ON outbox (inbox_id);

-- Hashes of forgotten users: nothing about them is stored or sent again.
CREATE TABLE forgotten (subject TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL);

CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);

-- What the bridge has learned about who an anonymous id belongs to: put on later calls,
-- sent to Millimetric once as identify, erased by forget.
CREATE TABLE identities (
    anonymous_id TEXT PRIMARY KEY,
    user_id TEXT COLLATE "C" NOT NULL,
    subject TEXT NOT NULL
);
CREATE INDEX identities_subject ON identities (subject);
CREATE INDEX identities_user ON identities (user_id);

-- Anonymous ids that stand for another one (a Stripe customer for the browser that paid).
CREATE TABLE aliases (
    alias TEXT PRIMARY KEY,
    anonymous_id TEXT NOT NULL
);
CREATE INDEX aliases_target ON aliases (anonymous_id);
