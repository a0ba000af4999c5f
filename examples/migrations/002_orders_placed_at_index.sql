-- Safe: built CONCURRENTLY, the index lets reads and writes go on while it builds
-- (it must run outside a transaction block).
CREATE INDEX CONCURRENTLY orders_placed_at_idx ON orders (placed_at);
