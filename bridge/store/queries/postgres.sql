-- The store's statements for PostgreSQL, by name (`bridge.store.sql`); sqlite.sql defines
-- the same names. Parameters are positional (`%s`), or named (`%(name)s`) where a
-- statement reads one twice; a list parameter is an array. A statement that writes rows
-- (`write` in bridge/store/operations.py) gets one array per column, in order, and takes
-- them all in one statement through unnest.

-- name: append
-- A delivery's inbox row; none for a redelivery (a row count of 0).
INSERT INTO inbox (source, provider_event_id, received_at, raw_body, headers, calls, state)
VALUES (%s, %s, %s, %s, %s, 0, %s)
ON CONFLICT (source, provider_event_id) DO NOTHING;

-- name: inbox_id
SELECT id FROM inbox WHERE source = %s AND provider_event_id = %s;

-- name: untranslated
-- By state, not by a cursor over ids: groups of several instances commit out of id order.
SELECT id, source, provider_event_id, received_at, raw_body, headers FROM inbox
WHERE state = 'untranslated' ORDER BY id LIMIT %s;

-- name: lock_untranslated
-- Which of these deliveries are still untranslated, locked until the batch commits (a
-- translator that took over in the meantime waits, then finds them translated).
SELECT id FROM inbox
WHERE state = 'untranslated' AND id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE;

-- name: mark
UPDATE inbox SET state = given.state, reason = given.reason, calls = given.calls
FROM unnest(%s::text[], %s::text[], %s::int[], %s::bigint[]) AS given (state, reason, calls, id)
WHERE inbox.id = given.id;

-- name: retranslate
UPDATE inbox SET state = 'untranslated', reason = NULL
WHERE raw_body IS NOT NULL AND state IN ('translated', 'quarantined')
  AND NOT %(none)s
  AND (%(deliveries)s::bigint[] IS NULL OR id = ANY(%(deliveries)s::bigint[]))
  AND (%(source)s::text IS NULL OR source = %(source)s::text)
  AND (%(since)s::float8 IS NULL OR received_at >= %(since)s::float8);

-- name: known_visitors
-- Each anonymous id, the visitor it stands for (through an alias) and that visitor's user.
SELECT given, COALESCE(a.anonymous_id, given), i.user_id
FROM unnest(%s::text[]) AS v (given)
LEFT JOIN aliases AS a ON a.alias = given
LEFT JOIN identities AS i ON i.anonymous_id = COALESCE(a.anonymous_id, given);

-- name: forgotten_among
SELECT subject FROM forgotten WHERE subject = ANY(%s::text[]);

-- name: upsert_aliases
INSERT INTO aliases (alias, anonymous_id) SELECT * FROM unnest(%s::text[], %s::text[])
ON CONFLICT (alias) DO UPDATE SET anonymous_id = excluded.anonymous_id;

-- name: upsert_identities
INSERT INTO identities (anonymous_id, user_id, subject)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])
ON CONFLICT (anonymous_id) DO UPDATE SET user_id = excluded.user_id, subject = excluded.subject;

-- name: link
INSERT INTO inbox_subjects (subject, inbox_id) SELECT * FROM unnest(%s::text[], %s::bigint[])
ON CONFLICT DO NOTHING;

-- name: queue
-- A call already queued or sent under its key is not queued again; rows go in order.
INSERT INTO outbox (inbox_id, route, subject, visitor, event_id, body, created_at, next_at)
SELECT inbox_id, route, subject, visitor, event_id, body, created_at, next_at
FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bytea[],
  %s::float8[], %s::float8[]) WITH ORDINALITY
  AS given (inbox_id, route, subject, visitor, event_id, body, created_at, next_at, position)
ORDER BY position ON CONFLICT DO NOTHING;

-- name: drop_raw
UPDATE inbox SET raw_body = NULL, headers = NULL WHERE id = ANY(%s::bigint[]);

-- name: alias_target
SELECT anonymous_id FROM aliases WHERE alias = %s;

-- name: user_of_visitor
SELECT user_id FROM identities WHERE anonymous_id = %s;

-- name: drop_linked_raw
-- The raw payloads of the deliveries linked to any of some subjects.
UPDATE inbox SET raw_body = NULL, headers = NULL
WHERE raw_body IS NOT NULL
  AND id IN (SELECT inbox_id FROM inbox_subjects WHERE subject = ANY(%s::text[]));

-- name: visitors_of
-- The visitors learned for a user (by subject), and their aliases.
SELECT anonymous_id FROM identities WHERE subject = %s
UNION SELECT alias FROM aliases
  WHERE anonymous_id IN (SELECT anonymous_id FROM identities WHERE subject = %s);

-- name: calls_of_visitors_to_user
UPDATE outbox SET subject = %s
WHERE subject IS NULL AND route != 'forget' AND visitor = ANY(%s::text[]);

-- name: links_of_visitors_to_user
INSERT INTO inbox_subjects (subject, inbox_id)
SELECT DISTINCT %s, inbox_id FROM inbox_subjects WHERE subject = ANY(%s::text[])
ON CONFLICT DO NOTHING;

-- name: erasure_lock
-- Until commit, alone: an erasure (`_erasure_lock` in bridge/store/operations.py).
SELECT pg_advisory_xact_lock(hashtextextended('millimetric-bridge erasure ' || current_schema(), 0));

-- name: erasure_lock_shared
-- Until commit, beside others: what writes or returns calls about someone.
SELECT pg_advisory_xact_lock_shared(
  hashtextextended('millimetric-bridge erasure ' || current_schema(), 0));

-- name: remember_forgotten
INSERT INTO forgotten (subject, at) VALUES (%s, %s) ON CONFLICT DO NOTHING;

-- name: forget_aliases
DELETE FROM aliases
WHERE anonymous_id IN (SELECT anonymous_id FROM identities WHERE subject = %s);

-- name: forget_identities
DELETE FROM identities WHERE subject = %s;

-- name: erase_calls
-- The calls about a subject, save forgets and sends in flight.
DELETE FROM outbox WHERE subject = %s AND route != 'forget'
  AND NOT (state = 'pending' AND claimed AND next_at > %s);

-- name: quarantined_bodies
SELECT id, raw_body FROM inbox WHERE state = 'quarantined' AND raw_body IS NOT NULL;

-- name: drop_quarantined
UPDATE inbox SET state = 'dropped', reason = given.reason, raw_body = NULL, headers = NULL
FROM unnest(%s::text[], %s::bigint[]) AS given (reason, id) WHERE inbox.id = given.id;

-- name: purge_prefix_calls
-- A range the (source, provider_event_id) index serves (the columns are COLLATE "C").
DELETE FROM outbox WHERE inbox_id IN (SELECT id FROM inbox
    WHERE source = %s AND provider_event_id >= %s AND provider_event_id < %s)
  AND route != 'forget' AND NOT (state = 'pending' AND claimed AND next_at > %s);

-- name: purge_prefix_raw
UPDATE inbox SET raw_body = NULL, headers = NULL
WHERE source = %s AND provider_event_id >= %s AND provider_event_id < %s;

-- name: purge_prefix_aliases
DELETE FROM aliases WHERE anonymous_id IN
  (SELECT anonymous_id FROM identities WHERE user_id >= %s AND user_id < %s);

-- name: purge_prefix_identities
DELETE FROM identities WHERE user_id >= %s AND user_id < %s;

-- name: drop_forgotten_claims
DELETE FROM outbox WHERE state = 'pending' AND claimed AND route != 'forget'
  AND subject IN (SELECT subject FROM forgotten);

-- name: release_claims
UPDATE outbox SET claimed = FALSE, next_at = %s WHERE state = 'pending' AND claimed;

-- name: drop_overtaken
-- Rows about a user whose forget is pending, not in flight: never sent.
DELETE FROM outbox WHERE state = 'pending' AND route != 'forget'
  AND subject IN (SELECT subject FROM outbox WHERE state = 'pending' AND route = 'forget')
  AND NOT (claimed AND next_at > %s);

-- name: claim_forgets
-- Forgets that no pending call about the same user could be overtaken by.
SELECT id, body, created_at, attempts FROM outbox AS f
WHERE state = 'pending' AND route = 'forget' AND next_at <= %s
  AND NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.subject = f.subject
    AND o.state = 'pending' AND o.route != 'forget')
ORDER BY next_at, id LIMIT %s FOR UPDATE SKIP LOCKED;

-- name: claim
SELECT id, body, created_at, attempts FROM outbox
WHERE state = 'pending' AND route = %s AND next_at <= %s ORDER BY next_at, id LIMIT %s
FOR UPDATE SKIP LOCKED;

-- name: lease
UPDATE outbox SET claimed = TRUE, next_at = given.next_at
FROM unnest(%s::float8[], %s::bigint[]) AS given (next_at, id) WHERE outbox.id = given.id;

-- name: forget_bodies
SELECT body FROM outbox WHERE route = 'forget' AND id = ANY(%s::bigint[]);

-- name: mark_delivered
UPDATE outbox SET state = 'delivered', claimed = FALSE, done_at = %s, reason = NULL
WHERE state = 'pending' AND id = ANY(%s::bigint[]);

-- name: drop_sent_about
DELETE FROM outbox WHERE state != 'pending' AND subject = %s;

-- name: retry
UPDATE outbox SET claimed = FALSE, next_at = %s, attempts = attempts + %s
WHERE state = 'pending' AND id = ANY(%s::bigint[]);

-- name: drop_forgotten_retries
DELETE FROM outbox WHERE route != 'forget' AND id = ANY(%s::bigint[])
  AND subject IN (SELECT subject FROM forgotten);

-- name: dead_letter
UPDATE outbox SET state = 'dead', claimed = FALSE, done_at = %s, reason = %s,
  attempts = attempts + 1
WHERE state = 'pending' AND id = ANY(%s::bigint[]);

-- name: hasten
UPDATE outbox SET next_at = %s
WHERE route = %s AND state = 'pending' AND NOT claimed AND attempts > 0 AND next_at > %s;

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
  (SELECT COUNT(*) FROM inbox), (SELECT COUNT(raw_body) FROM inbox),
  (SELECT value FROM meta WHERE key = 'paused');

-- name: dead_calls
SELECT o.id, o.route, i.source, o.event_id, o.reason, o.created_at, o.attempts, o.body
FROM outbox AS o LEFT JOIN inbox AS i ON i.id = o.inbox_id
WHERE o.state = 'dead' ORDER BY o.id LIMIT %s;

-- name: quarantined_letters
SELECT id, source, provider_event_id, reason, received_at, raw_body FROM inbox
WHERE state = 'quarantined' ORDER BY id LIMIT %s;

-- name: replay
-- A replay starts the row's life again: its max age counts from now.
UPDATE outbox SET state = 'pending', claimed = FALSE, next_at = %(now)s, attempts = 0,
  created_at = %(now)s, done_at = NULL, reason = NULL
WHERE (state = 'dead' OR (%(delivered)s AND state = 'delivered'))
  AND NOT %(none)s
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(source)s::text IS NULL
    OR inbox_id IN (SELECT id FROM inbox WHERE source = %(source)s::text))
  AND (%(since)s::float8 IS NULL OR created_at >= %(since)s::float8);

-- name: purge_calls
DELETE FROM outbox
WHERE state = 'dead'
  AND NOT %(none)s
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(source)s::text IS NULL
    OR inbox_id IN (SELECT id FROM inbox WHERE source = %(source)s::text))
  AND (%(since)s::float8 IS NULL OR created_at >= %(since)s::float8);

-- name: purge_deliveries
-- A quarantined delivery loses its payload; its inbox row stays, so that a redelivery of
-- it is still recognised.
UPDATE inbox SET state = 'dropped', raw_body = NULL, headers = NULL
WHERE state = 'quarantined'
  AND NOT %(none)s
  AND (%(deliveries)s::bigint[] IS NULL OR id = ANY(%(deliveries)s::bigint[]))
  AND (%(source)s::text IS NULL OR source = %(source)s::text)
  AND (%(since)s::float8 IS NULL OR received_at >= %(since)s::float8);

-- name: clean_delivered
DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
  WHERE state = 'delivered' AND done_at < %s LIMIT %s);

-- name: clean_raw
-- Retention leaves untranslated and quarantined deliveries alone: their raw payload is all
-- there is of them until they are translated or purged.
UPDATE inbox SET raw_body = NULL, headers = NULL WHERE id IN (SELECT id FROM inbox
  WHERE raw_body IS NOT NULL AND received_at < %s AND state = 'translated' LIMIT %s);

-- name: clean_inbox
DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE received_at < %s
  AND state IN ('translated', 'dropped')
  AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.inbox_id = inbox.id) LIMIT %s);

-- name: set_meta
INSERT INTO meta (key, value) VALUES (%s, %s)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: unset_meta
DELETE FROM meta WHERE key = %s;

-- name: meta
SELECT value FROM meta WHERE key = %s;

-- name: received
SELECT provider_event_id FROM inbox WHERE provider_event_id = ANY(%s::text[]) AND source = %s;

-- name: first_received
SELECT MIN(received_at) FROM inbox WHERE source = %s;

-- name: deliveries
-- The console's list, newest first: every source (inbox_received), after the cursor.
SELECT i.id, i.source, i.provider_event_id, i.received_at, i.state, i.calls,
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'pending'),
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'delivered'),
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'dead')
FROM inbox AS i
WHERE (%(state)s::text IS NULL OR i.state = %(state)s::text)
  AND (NOT %(dead)s
    OR EXISTS (SELECT 1 FROM outbox WHERE inbox_id = i.id AND state = 'dead'))
  AND (%(before)s::bigint IS NULL OR (i.received_at, i.id)
    < (SELECT received_at, id FROM inbox WHERE id = %(before)s::bigint))
ORDER BY i.received_at DESC, i.id DESC LIMIT %(limit)s;

-- name: source_deliveries
-- The same, of one source (inbox_source_received).
SELECT i.id, i.source, i.provider_event_id, i.received_at, i.state, i.calls,
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'pending'),
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'delivered'),
  (SELECT COUNT(*) FROM outbox WHERE inbox_id = i.id AND state = 'dead')
FROM inbox AS i
WHERE i.source = %(source)s::text
  AND (%(state)s::text IS NULL OR i.state = %(state)s::text)
  AND (NOT %(dead)s
    OR EXISTS (SELECT 1 FROM outbox WHERE inbox_id = i.id AND state = 'dead'))
  AND (%(before)s::bigint IS NULL OR (i.received_at, i.id)
    < (SELECT received_at, id FROM inbox WHERE id = %(before)s::bigint))
ORDER BY i.received_at DESC, i.id DESC LIMIT %(limit)s;

-- name: delivery
SELECT id, source, provider_event_id, received_at, state, reason, headers, LENGTH(raw_body)
FROM inbox WHERE id = %s;

-- name: delivery_calls
SELECT id, route, state, event_id, attempts, created_at, done_at, reason, claimed, next_at, body
FROM outbox WHERE inbox_id = %s ORDER BY id;

-- name: raw_body
SELECT raw_body FROM inbox WHERE id = %s;

-- name: source_activity
-- A source's latest delivery, and its deliveries (and those that failed) over the last hour
-- and day; the dead calls' deliveries come from outbox_done.
SELECT (SELECT MAX(received_at) FROM inbox WHERE source = %(source)s::text),
  (SELECT COUNT(*) FROM inbox WHERE source = %(source)s::text AND received_at >= %(hour)s),
  (SELECT COUNT(*) FROM inbox WHERE source = %(source)s::text AND received_at >= %(day)s),
  (SELECT COUNT(*) FROM inbox WHERE source = %(source)s::text AND received_at >= %(hour)s
    AND (state = 'quarantined' OR id IN (SELECT inbox_id FROM outbox
      WHERE state != 'pending' AND state = 'dead'))),
  (SELECT COUNT(*) FROM inbox WHERE source = %(source)s::text AND received_at >= %(day)s
    AND (state = 'quarantined' OR id IN (SELECT inbox_id FROM outbox
      WHERE state != 'pending' AND state = 'dead')));

-- name: rate_received
SELECT FLOOR((received_at - %(since)s::float8) / %(step)s::float8)::int AS bucket, COUNT(*) FROM inbox
WHERE received_at >= %(since)s::float8 GROUP BY bucket;

-- name: rate_delivered
SELECT FLOOR((done_at - %(since)s::float8) / %(step)s::float8)::int AS bucket, COUNT(*) FROM outbox
WHERE state != 'pending' AND state = 'delivered' AND done_at >= %(since)s::float8 GROUP BY bucket;

-- name: rate_dead
SELECT FLOOR((done_at - %(since)s::float8) / %(step)s::float8)::int AS bucket, COUNT(*) FROM outbox
WHERE state != 'pending' AND state = 'dead' AND done_at >= %(since)s::float8 GROUP BY bucket;
