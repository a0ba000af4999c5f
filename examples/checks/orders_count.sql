-- No order is lost: a single `true` passes.
SELECT count(*) = 5000 FROM orders
