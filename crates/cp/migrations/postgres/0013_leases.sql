-- Leases (#23): which control plane replica runs each background duty (lifecycles, the
-- fleet's watch, reconcile). A holder renews its lease before it expires; another takes it
-- only after. The fencing token rises whenever the holder changes, so work a duty does can be
-- checked against the lease it was done under.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
