-- The console lists a source's newest deliveries and counts its recent ones: both read
-- this index, not the whole inbox.
CREATE INDEX inbox_source_received ON inbox (source, received_at);
