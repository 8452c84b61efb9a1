CREATE TABLE IF NOT EXISTS teams (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, team_id TEXT NOT NULL REFERENCES teams(id), name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY, team_id TEXT NOT NULL REFERENCES teams(id), template_id TEXT NOT NULL,
    alias TEXT, state TEXT NOT NULL, started_at_ms INTEGER NOT NULL, end_at_ms INTEGER NOT NULL,
    metadata TEXT NOT NULL, envd_access_token TEXT, auto_pause INTEGER NOT NULL,
    allow_internet INTEGER NOT NULL, cpu_count INTEGER NOT NULL, memory_mb INTEGER NOT NULL,
    envd_version TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sandboxes_by_team ON sandboxes (team_id, started_at_ms, id);
CREATE INDEX IF NOT EXISTS sandboxes_by_end ON sandboxes (end_at_ms);
