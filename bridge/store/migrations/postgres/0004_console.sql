-- As the SQLite backend's migration 0006: a source's newest deliveries, for the console.
CREATE INDEX inbox_source_received ON inbox (source, received_at);
