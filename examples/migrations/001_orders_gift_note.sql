-- Safe: a nullable column without a default is a catalog change only; the
-- ACCESS EXCLUSIVE lock it takes is held for milliseconds.
ALTER TABLE orders ADD COLUMN gift_note text;
