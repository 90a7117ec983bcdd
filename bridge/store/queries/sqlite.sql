-- The store's statements for SQLite, by name (`bridge.store.sql`); postgres.sql defines
-- the same names. Parameters are positional (`?`), or named (`:name`) where a statement
-- reads one twice. A list parameter arrives as JSON text, which `json_each(?)` reads: ids
-- and hashes only (SQLite's JSON cuts a text at a NUL); `?*` spreads a list of any text
-- (the statement's first parameter).

-- name: append
-- A delivery's inbox row; none for a redelivery (a row count of 0).
INSERT INTO inbox (source, provider_event_id, received_at, raw_body, headers, calls, state)
VALUES (?, ?, ?, ?, ?, 0, ?)
ON CONFLICT (source, provider_event_id) DO NOTHING;

-- name: inbox_id
SELECT id FROM inbox WHERE source = ? AND provider_event_id = ?;

-- name: untranslated
SELECT id, source, provider_event_id, received_at, raw_body, headers FROM inbox
WHERE state = 'untranslated' ORDER BY id LIMIT ?;

-- name: lock_untranslated
-- Which of these deliveries are still untranslated (the writer holds the lock already).
SELECT id FROM inbox
WHERE state = 'untranslated' AND id IN (SELECT value FROM json_each(?)) ORDER BY id;

-- name: mark
UPDATE inbox SET state = ?, reason = ?, calls = ? WHERE id = ?;

-- name: retranslate
UPDATE inbox SET state = 'untranslated', reason = NULL
WHERE raw_body IS NOT NULL AND state IN ('translated', 'quarantined')
  AND NOT :none
  AND (:deliveries IS NULL OR id IN (SELECT value FROM json_each(:deliveries)))
  AND (:source IS NULL OR source = :source)
  AND (:since IS NULL OR received_at >= :since);

-- name: known_visitors
-- Each anonymous id, the visitor it stands for (through an alias) and that visitor's user.
-- `?*` is a list spread over a placeholder a value: json_each would cut an id at a NUL.
SELECT v.column1, COALESCE(a.anonymous_id, v.column1), i.user_id
FROM (VALUES ?*) AS v
LEFT JOIN aliases AS a ON a.alias = v.column1
LEFT JOIN identities AS i ON i.anonymous_id = COALESCE(a.anonymous_id, v.column1);

-- name: forgotten_among
SELECT subject FROM forgotten WHERE subject IN (SELECT value FROM json_each(?));

-- name: upsert_aliases
INSERT INTO aliases (alias, anonymous_id) VALUES (?, ?)
ON CONFLICT (alias) DO UPDATE SET anonymous_id = excluded.anonymous_id;

-- name: upsert_identities
INSERT INTO identities (anonymous_id, user_id, subject) VALUES (?, ?, ?)
ON CONFLICT (anonymous_id) DO UPDATE SET user_id = excluded.user_id, subject = excluded.subject;

-- name: link
INSERT OR IGNORE INTO inbox_subjects (subject, inbox_id) VALUES (?, ?);

-- name: queue
-- A call already queued or sent under its key is not queued again.
INSERT INTO outbox (inbox_id, route, subject, visitor, event_id, body, created_at, next_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING;

-- name: drop_raw
UPDATE inbox SET raw_body = NULL, headers = NULL WHERE id = ?;

-- name: alias_target
SELECT anonymous_id FROM aliases WHERE alias = ?;

-- name: user_of_visitor
SELECT user_id FROM identities WHERE anonymous_id = ?;

-- name: drop_linked_raw
-- The raw payloads of the deliveries linked to any of some subjects.
UPDATE inbox SET raw_body = NULL, headers = NULL
WHERE raw_body IS NOT NULL AND id IN (SELECT inbox_id FROM inbox_subjects
  WHERE subject IN (SELECT value FROM json_each(?)));

-- name: visitors_of
-- The visitors learned for a user (by subject), and their aliases.
SELECT anonymous_id FROM identities WHERE subject = ?
UNION SELECT alias FROM aliases
  WHERE anonymous_id IN (SELECT anonymous_id FROM identities WHERE subject = ?);

-- name: calls_of_visitors_to_user
UPDATE outbox SET subject = ?
WHERE subject IS NULL AND route != 'forget' AND visitor IN (SELECT value FROM json_each(?));

-- name: links_of_visitors_to_user
INSERT OR IGNORE INTO inbox_subjects (subject, inbox_id)
SELECT DISTINCT ?, inbox_id FROM inbox_subjects
WHERE subject IN (SELECT value FROM json_each(?));

-- name: erasure_lock
-- (postgres.sql takes a lock here; SQLite runs one write transaction at a time.)
SELECT 1;

-- name: erasure_lock_shared
SELECT 1;

-- name: remember_forgotten
INSERT INTO forgotten (subject, at) VALUES (?, ?) ON CONFLICT DO NOTHING;

-- name: forget_aliases
DELETE FROM aliases
WHERE anonymous_id IN (SELECT anonymous_id FROM identities WHERE subject = ?);

-- name: forget_identities
DELETE FROM identities WHERE subject = ?;

-- name: erase_calls
-- The calls about a subject, save forgets and sends in flight.
DELETE FROM outbox WHERE subject = ? AND route != 'forget'
  AND NOT (state = 'pending' AND claimed = 1 AND next_at > ?);

-- name: quarantined_bodies
SELECT id, raw_body FROM inbox WHERE state = 'quarantined' AND raw_body IS NOT NULL;

-- name: drop_quarantined
UPDATE inbox SET state = 'dropped', reason = ?, raw_body = NULL, headers = NULL WHERE id = ?;

-- name: purge_prefix_calls
DELETE FROM outbox WHERE inbox_id IN (SELECT id FROM inbox
    WHERE source = ? AND provider_event_id >= ? AND provider_event_id < ?)
  AND route != 'forget' AND NOT (state = 'pending' AND claimed = 1 AND next_at > ?);

-- name: purge_prefix_raw
UPDATE inbox SET raw_body = NULL, headers = NULL
WHERE source = ? AND provider_event_id >= ? AND provider_event_id < ?;

-- name: purge_prefix_aliases
DELETE FROM aliases WHERE anonymous_id IN
  (SELECT anonymous_id FROM identities WHERE user_id >= ? AND user_id < ?);

-- name: purge_prefix_identities
DELETE FROM identities WHERE user_id >= ? AND user_id < ?;

-- name: drop_forgotten_claims
DELETE FROM outbox WHERE state = 'pending' AND claimed = 1 AND route != 'forget'
  AND subject IN (SELECT subject FROM forgotten);

-- name: release_claims
UPDATE outbox SET claimed = 0, next_at = ? WHERE state = 'pending' AND claimed = 1;

-- name: drop_overtaken
-- Rows about a user whose forget is pending, not in flight: never sent.
DELETE FROM outbox WHERE state = 'pending' AND route != 'forget'
  AND subject IN (SELECT subject FROM outbox WHERE state = 'pending' AND route = 'forget')
  AND NOT (claimed = 1 AND next_at > ?);

-- name: claim_forgets
-- Forgets that no pending call about the same user could be overtaken by.
SELECT id, body, created_at, attempts FROM outbox AS f
WHERE state = 'pending' AND route = 'forget' AND next_at <= ?
  AND NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.subject = f.subject
    AND o.state = 'pending' AND o.route != 'forget')
ORDER BY next_at, id LIMIT ?;

-- name: claim
SELECT id, body, created_at, attempts FROM outbox
WHERE state = 'pending' AND route = ? AND next_at <= ? ORDER BY next_at, id LIMIT ?;

-- name: lease
UPDATE outbox SET claimed = 1, next_at = ? WHERE id = ?;

-- name: forget_bodies
SELECT body FROM outbox WHERE route = 'forget' AND id IN (SELECT value FROM json_each(?));

-- name: mark_delivered
UPDATE outbox SET state = 'delivered', claimed = 0, done_at = ?, reason = NULL
WHERE state = 'pending' AND id IN (SELECT value FROM json_each(?));

-- name: drop_sent_about
DELETE FROM outbox WHERE state != 'pending' AND subject = ?;

-- name: retry
UPDATE outbox SET claimed = 0, next_at = ?, attempts = attempts + ?
WHERE state = 'pending' AND id IN (SELECT value FROM json_each(?));

-- name: drop_forgotten_retries
DELETE FROM outbox WHERE route != 'forget' AND id IN (SELECT value FROM json_each(?))
  AND subject IN (SELECT subject FROM forgotten);

-- name: dead_letter
UPDATE outbox SET state = 'dead', claimed = 0, done_at = ?, reason = ?, attempts = attempts + 1
WHERE state = 'pending' AND id IN (SELECT value FROM json_each(?));

-- name: hasten
UPDATE outbox SET next_at = ?
WHERE route = ? AND state = 'pending' AND claimed = 0 AND attempts > 0 AND next_at > ?;

-- name: backlog
-- Each count from a partial index (`state != 'pending'` lets the dead count use outbox_done).
SELECT (SELECT COUNT(*) FROM outbox WHERE state = 'pending'),
  (SELECT COUNT(*) FROM outbox WHERE state != 'pending' AND state = 'dead'),
  (SELECT created_at FROM outbox WHERE state = 'pending' ORDER BY id LIMIT 1),
  (SELECT COUNT(*) FROM inbox WHERE state = 'untranslated'),
  (SELECT received_at FROM inbox WHERE state = 'untranslated' ORDER BY id LIMIT 1),
  (SELECT COUNT(*) FROM inbox WHERE state = 'quarantined');

-- name: counts
SELECT (SELECT COUNT(*) FROM outbox WHERE state != 'pending' AND state = 'delivered'),
  (SELECT COUNT(*) FROM inbox), (SELECT COUNT(*) FROM inbox WHERE raw_body IS NOT NULL),
  (SELECT value FROM meta WHERE key = 'paused');

-- name: dead_calls
SELECT o.id, o.route, i.source, o.event_id, o.reason, o.created_at, o.attempts, o.body
FROM outbox AS o LEFT JOIN inbox AS i ON i.id = o.inbox_id
WHERE o.state = 'dead' ORDER BY o.id LIMIT ?;

-- name: quarantined_letters
SELECT id, source, provider_event_id, reason, received_at, raw_body FROM inbox
WHERE state = 'quarantined' ORDER BY id LIMIT ?;

-- name: replay
-- A replay starts the row's life again: its max age counts from now.
UPDATE outbox SET state = 'pending', claimed = 0, next_at = :now, attempts = 0,
  created_at = :now, done_at = NULL, reason = NULL
WHERE (state = 'dead' OR (:delivered AND state = 'delivered'))
  AND NOT :none
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
  AND (:source IS NULL OR inbox_id IN (SELECT id FROM inbox WHERE source = :source))
  AND (:since IS NULL OR created_at >= :since);

-- name: purge_calls
DELETE FROM outbox
WHERE state = 'dead'
  AND NOT :none
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
  AND (:source IS NULL OR inbox_id IN (SELECT id FROM inbox WHERE source = :source))
  AND (:since IS NULL OR created_at >= :since);

-- name: purge_deliveries
-- A quarantined delivery loses its payload; its inbox row stays, so that a redelivery of
-- it is still recognised.
UPDATE inbox SET state = 'dropped', raw_body = NULL, headers = NULL
WHERE state = 'quarantined'
  AND NOT :none
  AND (:deliveries IS NULL OR id IN (SELECT value FROM json_each(:deliveries)))
  AND (:source IS NULL OR source = :source)
  AND (:since IS NULL OR received_at >= :since);

-- name: clean_delivered
DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
  WHERE state = 'delivered' AND done_at < ? LIMIT ?);

-- name: clean_raw
-- Retention leaves untranslated and quarantined deliveries alone: their raw payload is all
-- there is of them until they are translated or purged.
UPDATE inbox SET raw_body = NULL, headers = NULL WHERE id IN (SELECT id FROM inbox
  WHERE raw_body IS NOT NULL AND received_at < ? AND state = 'translated' LIMIT ?);

-- name: clean_inbox
DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE received_at < ?
  AND state IN ('translated', 'dropped')
  AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.inbox_id = inbox.id) LIMIT ?);

-- name: set_meta
INSERT INTO meta (key, value) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: unset_meta
DELETE FROM meta WHERE key = ?;

-- name: meta
SELECT value FROM meta WHERE key = ?;

-- name: received
-- Which of these delivery ids of a source the inbox holds (the list, spread, then the
-- source: provider ids are any text).
SELECT provider_event_id FROM inbox
WHERE provider_event_id IN (SELECT column1 FROM (VALUES ?*)) AND source = ?;

-- name: first_received
SELECT MIN(received_at) FROM inbox WHERE source = ?;

-- name: deliveries
-- The console's list, newest first: every source (inbox_received), after the cursor.
SELECT i.id, i.source, i.provider_event_id, i.received_at, i.state, i.calls,
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'pending'),
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'delivered'),
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'dead')
FROM inbox AS i
WHERE (:state IS NULL OR i.state = :state)
  AND (NOT :dead OR EXISTS (SELECT 1 FROM outbox WHERE inbox_id = i.id AND state = 'dead'))
  AND (:before IS NULL
    OR (i.received_at, i.id) < (SELECT received_at, id FROM inbox WHERE id = :before))
ORDER BY i.received_at DESC, i.id DESC LIMIT :limit;

-- name: source_deliveries
-- The same, of one source (inbox_source_received).
SELECT i.id, i.source, i.provider_event_id, i.received_at, i.state, i.calls,
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'pending'),
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'delivered'),
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'dead')
FROM inbox AS i
WHERE i.source = :source
  AND (:state IS NULL OR i.state = :state)
  AND (NOT :dead OR EXISTS (SELECT 1 FROM outbox WHERE inbox_id = i.id AND state = 'dead'))
  AND (:before IS NULL
    OR (i.received_at, i.id) < (SELECT received_at, id FROM inbox WHERE id = :before))
ORDER BY i.received_at DESC, i.id DESC LIMIT :limit;

-- name: delivery
SELECT id, source, provider_event_id, received_at, state, reason, headers, LENGTH(raw_body)
FROM inbox WHERE id = ?;

-- name: delivery_calls
SELECT id, route, state, event_id, attempts, created_at, done_at, reason, claimed, next_at, body
FROM outbox WHERE inbox_id = ? ORDER BY id;

-- name: raw_body
SELECT raw_body FROM inbox WHERE id = ?;

-- name: source_activity
-- A source's latest delivery, and its deliveries (and those that failed) over the last hour
-- and day; the dead calls' deliveries come from outbox_done.
SELECT (SELECT MAX(received_at) FROM inbox WHERE source = :source),
  (SELECT COUNT(*) FROM inbox WHERE source = :source AND received_at >= :hour),
  (SELECT COUNT(*) FROM inbox WHERE source = :source AND received_at >= :day),
  (SELECT COUNT(*) FROM inbox WHERE source = :source AND received_at >= :hour
    AND (state = 'quarantined' OR id IN (SELECT inbox_id FROM outbox
      WHERE state != 'pending' AND state = 'dead'))),
  (SELECT COUNT(*) FROM inbox WHERE source = :source AND received_at >= :day
    AND (state = 'quarantined' OR id IN (SELECT inbox_id FROM outbox
      WHERE state != 'pending' AND state = 'dead')));

-- name: rate_received
SELECT CAST((received_at - :since) / :step AS INTEGER) AS bucket, COUNT(*) FROM inbox
WHERE received_at >= :since GROUP BY bucket;

-- name: rate_delivered
SELECT CAST((done_at - :since) / :step AS INTEGER) AS bucket, COUNT(*) FROM outbox
WHERE state != 'pending' AND state = 'delivered' AND done_at >= :since GROUP BY bucket;

-- name: rate_dead
SELECT CAST((done_at - :since) / :step AS INTEGER) AS bucket, COUNT(*) FROM outbox
WHERE state != 'pending' AND state = 'dead' AND done_at >= :since GROUP BY bucket;
