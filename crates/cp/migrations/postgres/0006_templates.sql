CREATE TABLE IF NOT EXISTS templates (
    id TEXT PRIMARY KEY, team_id TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    alias TEXT UNIQUE, public BOOLEAN NOT NULL DEFAULT FALSE, cpu_count INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL, created_at_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL,
    ready_build_id TEXT);
CREATE INDEX IF NOT EXISTS templates_by_team ON templates (team_id);
CREATE TABLE IF NOT EXISTS template_builds (
    id TEXT PRIMARY KEY, template_id TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    status TEXT NOT NULL, reason TEXT, reason_step TEXT, from_template TEXT NOT NULL,
    host_id TEXT, host_template_id TEXT NOT NULL, cpu_count INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL, disk_size_mb INTEGER NOT NULL DEFAULT 0,
    envd_version TEXT NOT NULL DEFAULT '', created_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT NOT NULL DEFAULT 0, tags TEXT NOT NULL DEFAULT '[]');
CREATE INDEX IF NOT EXISTS template_builds_by_template ON template_builds (template_id);
CREATE TABLE IF NOT EXISTS template_build_logs (
    build_id TEXT NOT NULL REFERENCES template_builds (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL, timestamp_ms BIGINT NOT NULL, level TEXT NOT NULL,
    message TEXT NOT NULL, step TEXT, PRIMARY KEY (build_id, seq));
CREATE TABLE IF NOT EXISTS template_tags (
    template_id TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE, tag TEXT NOT NULL,
    build_id TEXT NOT NULL REFERENCES template_builds (id) ON DELETE CASCADE,
    created_at_ms BIGINT NOT NULL, PRIMARY KEY (template_id, tag));
