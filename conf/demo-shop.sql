-- The demo source database `shop`, seeded by the embedded server on first start.
-- Deterministic: every fresh demo has the same rows.

CREATE TABLE customers (
    id          bigint PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    name        text NOT NULL,
    country     text NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE products (
    id          bigint PRIMARY KEY,
    sku         text NOT NULL UNIQUE,
    title       text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents > 0),
    stock       integer NOT NULL CHECK (stock >= 0)
);

CREATE TABLE orders (
    id          bigint PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers(id),
    status      text NOT NULL CHECK (status IN ('pending', 'paid', 'shipped', 'cancelled')),
    placed_at   timestamptz NOT NULL
);

CREATE TABLE order_items (
    order_id    bigint NOT NULL REFERENCES orders(id),
    product_id  bigint NOT NULL REFERENCES products(id),
    quantity    integer NOT NULL CHECK (quantity > 0),
    price_cents integer NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

INSERT INTO customers
SELECT i,
       'customer' || i || '@example.com',
       (ARRAY['Ada','Grace','Linus','Barbara','Edsger','Margaret','Ken','Frances'])[1 + i % 8]
         || ' ' ||
       (ARRAY['Lovelace','Hopper','Torvalds','Liskov','Dijkstra','Hamilton','Thompson','Allen'])[1 + (i * 7) % 8],
       (ARRAY['NL','DE','FR','US','JP','BR','IN','KE'])[1 + (i * 3) % 8],
       timestamptz '2024-01-01' + (i * interval '37 minutes')
FROM generate_series(1, 2000) AS i;

INSERT INTO products
SELECT i,
       'SKU-' || lpad(i::text, 5, '0'),
       (ARRAY['Mug','Notebook','Lamp','Chair','Desk','Cable','Backpack','Bottle'])[1 + i % 8] || ' #' || i,
       199 + (i * 137) % 9800,
       (i * 31) % 500
FROM generate_series(1, 200) AS i;

INSERT INTO orders
SELECT i,
       1 + (i * 7919) % 2000,
       (ARRAY['pending','paid','shipped','cancelled'])[1 + (i * 13) % 4],
       timestamptz '2024-03-01' + (i * interval '11 minutes')
FROM generate_series(1, 5000) AS i;

INSERT INTO order_items
SELECT o, 1 + (o * 17 + k * 61) % 200, 1 + (o + k) % 4, 0
FROM generate_series(1, 5000) AS o, generate_series(1, 3) AS k
ON CONFLICT DO NOTHING;

UPDATE order_items oi SET price_cents = p.price_cents FROM products p WHERE p.id = oi.product_id;

CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE INDEX order_items_product_idx ON order_items (product_id);
ANALYZE;
