CREATE TABLE IF NOT EXISTS hosts (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, api_url TEXT NOT NULL,
    proxy_address TEXT NOT NULL, agent_token TEXT NOT NULL, heartbeat_hash TEXT NOT NULL,
    state TEXT NOT NULL, report TEXT NOT NULL, last_heartbeat_ms INTEGER NOT NULL,
    registered_at_ms INTEGER NOT NULL);
ALTER TABLE sandboxes ADD COLUMN host_id TEXT NOT NULL DEFAULT 'local';
CREATE INDEX IF NOT EXISTS sandboxes_by_host ON sandboxes (host_id);
