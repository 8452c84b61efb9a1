CREATE TABLE IF NOT EXISTS hosts (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, api_url TEXT NOT NULL,
    proxy_address TEXT NOT NULL, agent_token TEXT NOT NULL, heartbeat_hash TEXT NOT NULL,
    state TEXT NOT NULL, report JSONB NOT NULL, last_heartbeat_ms BIGINT NOT NULL,
    registered_at_ms BIGINT NOT NULL);
ALTER TABLE sandboxes ADD COLUMN IF NOT EXISTS host_id TEXT NOT NULL DEFAULT 'local';
CREATE INDEX IF NOT EXISTS sandboxes_by_host ON sandboxes (host_id);
