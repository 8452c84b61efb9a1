CREATE TABLE IF NOT EXISTS events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    at_ms BIGINT NOT NULL, team_id TEXT NOT NULL, actor TEXT NOT NULL, kind TEXT NOT NULL,
    subject TEXT NOT NULL, data JSONB NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_team ON events (team_id, seq);
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    at_ms BIGINT NOT NULL, team_id TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    resource TEXT NOT NULL, outcome BIGINT NOT NULL, client TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_by_team ON audit_log (team_id, seq);
CREATE OR REPLACE FUNCTION wrenn_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION wrenn_audit_append_only();
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'owner';
ALTER TABLE api_keys ADD COLUMN mask_suffix TEXT NOT NULL DEFAULT '';
