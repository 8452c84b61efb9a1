ALTER TABLE sandboxes ADD COLUMN traffic_access_token TEXT;
ALTER TABLE sandboxes ADD COLUMN auto_resume INTEGER NOT NULL DEFAULT 0;
