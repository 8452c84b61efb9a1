-- What hosts saw of their sandboxes (`crate::telemetry`): resource samples at three resolutions
-- (`tier` 0: as sampled, every few seconds; 1: a minute's average; 2: ten minutes'), each kept
-- for its own retention; the log lines of each sandbox (its console and envd's log), capped in
-- size per sandbox and kept for a while after it ended; and each team's use per UTC day.
-- Rows name the team, so a killed sandbox's history stays its team's alone.
CREATE TABLE IF NOT EXISTS sandbox_metrics (
    sandbox_id TEXT NOT NULL, team_id TEXT NOT NULL, tier INTEGER NOT NULL, at_ms INTEGER NOT NULL,
    cpu_count INTEGER NOT NULL, cpu_used_pct REAL NOT NULL,
    mem_used INTEGER NOT NULL, mem_total INTEGER NOT NULL, mem_cache INTEGER NOT NULL,
    disk_used INTEGER NOT NULL, disk_total INTEGER NOT NULL,
    net_rx_bytes INTEGER NOT NULL, net_tx_bytes INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, tier, at_ms));
CREATE INDEX IF NOT EXISTS sandbox_metrics_by_tier ON sandbox_metrics (tier, at_ms);
-- How far each coarser tier has been made from the finer one.
CREATE TABLE IF NOT EXISTS metrics_rollups (tier INTEGER PRIMARY KEY, done_until_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sandbox_logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, sandbox_id TEXT NOT NULL, team_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL,
    fields TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS sandbox_logs_by_sandbox ON sandbox_logs (sandbox_id, at_ms, seq);
-- Milliseconds sandboxes ran, and the same weighted by their memory in MiB.
CREATE TABLE IF NOT EXISTS team_usage (
    team_id TEXT NOT NULL, day TEXT NOT NULL, sandbox_ms INTEGER NOT NULL DEFAULT 0,
    mib_ms INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (team_id, day));
