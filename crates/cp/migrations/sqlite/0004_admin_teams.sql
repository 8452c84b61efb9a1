ALTER TABLE teams ADD COLUMN admin INTEGER NOT NULL DEFAULT 0;
UPDATE teams SET admin = 1 WHERE name = 'default';
