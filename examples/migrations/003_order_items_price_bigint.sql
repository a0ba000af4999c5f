-- Dangerous: changing a column's type rewrites the whole table (and rebuilds its
-- indexes) under an ACCESS EXCLUSIVE lock. On the demo's biggest table it is quick;
-- on a production-sized one, every read and write of order_items waits for it.
-- The rehearsal reports it as `table-rewrite` and exits with 3.
ALTER TABLE order_items ALTER COLUMN price_cents TYPE bigint;
