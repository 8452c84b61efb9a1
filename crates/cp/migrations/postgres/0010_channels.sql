-- Notification channels and their outbox: a delivery row per channel an event goes to, made by
-- the trigger in the event's own transaction, so no crash can record an event and lose its
-- deliveries. `events` is the channel's filter as `,kind,kind,` (empty: every kind); a
-- `channel.test` event goes to the channel it names (its subject) only.
CREATE TABLE IF NOT EXISTS channels (
    id TEXT PRIMARY KEY, team_id TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    url_sealed TEXT NOT NULL, secret_sealed TEXT NOT NULL DEFAULT '',
    events TEXT NOT NULL DEFAULT '', enabled BOOLEAN NOT NULL DEFAULT TRUE,
    consecutive_failures BIGINT NOT NULL DEFAULT 0, disabled_reason TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS channels_by_team ON channels (team_id);
CREATE TABLE IF NOT EXISTS channel_deliveries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id TEXT NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    event_seq BIGINT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts BIGINT NOT NULL DEFAULT 0, next_attempt_at_ms BIGINT NOT NULL DEFAULT 0,
    last_status BIGINT NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
    updated_at_ms BIGINT NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS channel_deliveries_by_channel
    ON channel_deliveries (channel_id, state, event_seq);
CREATE OR REPLACE FUNCTION wrenn_events_to_channels() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO channel_deliveries (channel_id, event_seq, updated_at_ms)
    SELECT c.id, NEW.seq, NEW.at_ms FROM channels c
    WHERE c.team_id = NEW.team_id AND c.enabled
      AND CASE WHEN NEW.kind = 'channel.test' THEN c.id = NEW.subject
               ELSE c.events = '' OR strpos(c.events, ',' || NEW.kind || ',') > 0 END;
    RETURN NULL;
END;
$$;
CREATE TRIGGER events_to_channels AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION wrenn_events_to_channels();
