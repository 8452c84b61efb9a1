-- Notification channels and their outbox: a delivery row per channel an event goes to, made by
-- the trigger in the event's own transaction, so no crash can record an event and lose its
-- deliveries. `events` is the channel's filter as `,kind,kind,` (empty: every kind); a
-- `channel.test` event goes to the channel it names (its subject) only.
CREATE TABLE IF NOT EXISTS channels (
    id TEXT PRIMARY KEY, team_id TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    url_sealed TEXT NOT NULL, secret_sealed TEXT NOT NULL DEFAULT '',
    events TEXT NOT NULL DEFAULT '', enabled INTEGER NOT NULL DEFAULT 1,
    consecutive_failures INTEGER NOT NULL DEFAULT 0, disabled_reason TEXT NOT NULL DEFAULT '',
    created_at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS channels_by_team ON channels (team_id);
CREATE TABLE IF NOT EXISTS channel_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id TEXT NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    event_seq INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at_ms INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
    updated_at_ms INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS channel_deliveries_by_channel
    ON channel_deliveries (channel_id, state, event_seq);
CREATE TRIGGER IF NOT EXISTS events_to_channels AFTER INSERT ON events
BEGIN
    INSERT INTO channel_deliveries (channel_id, event_seq, updated_at_ms)
    SELECT c.id, NEW.seq, NEW.at_ms FROM channels c
    WHERE c.team_id = NEW.team_id AND c.enabled = 1
      AND CASE WHEN NEW.kind = 'channel.test' THEN c.id = NEW.subject
               ELSE c.events = '' OR instr(c.events, ',' || NEW.kind || ',') > 0 END;
END;
