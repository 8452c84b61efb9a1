-- Control plane replicas (#23): what replicas share beyond the leases.
-- Creates by Idempotency-Key (#23), kept in the store so that a create retried on another
-- replica finds the first one's sandbox. A key is claimed before its create starts (sandbox_id
-- empty while it runs, so that a retry arriving meanwhile waits for it rather than creating a
-- second sandbox) and settled with the sandbox it made; a failed create gives its claim up. A
-- claim is its claimant's (one create call); one left by a replica that died is taken over once
-- it is stale. Keys are forgotten a day after they were claimed.
CREATE TABLE idempotency_keys (
    team_id TEXT NOT NULL,
    key TEXT NOT NULL,
    claimant TEXT NOT NULL,
    sandbox_id TEXT NOT NULL DEFAULT '',
    claimed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (team_id, key)
);
-- How far the hosts' telemetry has been collected (`crate::telemetry`), written with each
-- collection's rows, so that a replica taking the collection over goes on where the last one
-- stopped instead of collecting again what the host still buffers.
CREATE TABLE telemetry_cursors (
    host_id TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    after BIGINT NOT NULL
);
