-- Anonymous ids that stand for another one (a Stripe customer for the browser that paid).
CREATE TABLE aliases (
    alias TEXT PRIMARY KEY,
    anonymous_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX aliases_target ON aliases (anonymous_id);
