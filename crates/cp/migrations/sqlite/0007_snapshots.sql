ALTER TABLE templates ADD COLUMN source_sandbox_id TEXT;
ALTER TABLE sandboxes ADD COLUMN auto_pause_memory INTEGER NOT NULL DEFAULT 1;
ALTER TABLE sandboxes ADD COLUMN paused_disk_only INTEGER NOT NULL DEFAULT 0;
