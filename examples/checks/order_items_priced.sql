-- Every order item keeps a positive price (violations: the rows returned).
SELECT order_id, product_id, price_cents
FROM order_items
WHERE price_cents IS NULL OR price_cents <= 0
ORDER BY order_id, product_id
