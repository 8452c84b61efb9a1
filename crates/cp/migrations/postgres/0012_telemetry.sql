-- What hosts saw of their sandboxes (`crate::telemetry`): resource samples at three resolutions
-- (`tier` 0: as sampled, every few seconds; 1: a minute's average; 2: ten minutes'), each kept
-- for its own retention; the log lines of each sandbox (its console and envd's log), capped in
-- size per sandbox and kept for a while after it ended; and each team's use per UTC day.
-- Rows name the team, so a killed sandbox's history stays its team's alone.
CREATE TABLE IF NOT EXISTS sandbox_metrics (
    sandbox_id TEXT NOT NULL, team_id TEXT NOT NULL, tier BIGINT NOT NULL, at_ms BIGINT NOT NULL,
    cpu_count INTEGER NOT NULL, cpu_used_pct DOUBLE PRECISION NOT NULL,
    mem_used BIGINT NOT NULL, mem_total BIGINT NOT NULL, mem_cache BIGINT NOT NULL,
    disk_used BIGINT NOT NULL, disk_total BIGINT NOT NULL,
    net_rx_bytes BIGINT NOT NULL, net_tx_bytes BIGINT NOT NULL,
    PRIMARY KEY (sandbox_id, tier, at_ms));
CREATE INDEX IF NOT EXISTS sandbox_metrics_by_tier ON sandbox_metrics (tier, at_ms);
-- How far each coarser tier has been made from the finer one.
CREATE TABLE IF NOT EXISTS metrics_rollups (tier BIGINT PRIMARY KEY, done_until_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS sandbox_logs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, sandbox_id TEXT NOT NULL,
    team_id TEXT NOT NULL, at_ms BIGINT NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL,
    fields TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS sandbox_logs_by_sandbox ON sandbox_logs (sandbox_id, at_ms, seq);
-- Milliseconds sandboxes ran, and the same weighted by their memory in MiB.
CREATE TABLE IF NOT EXISTS team_usage (
    team_id TEXT NOT NULL, day TEXT NOT NULL, sandbox_ms BIGINT NOT NULL DEFAULT 0,
    mib_ms BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (team_id, day));
