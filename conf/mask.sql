-- Masks the personal data of the demo source `shop` in each new snapshot, before
-- the snapshot is sealed and before any branch is made from it:
--   snapshot_transform = ["conf/mask.sql"]
-- Deterministic: a value's mask is the md5 of the value, so the same customer gets
-- the same mask in every snapshot, masked emails stay unique, and ids (and so every
-- join) are unchanged.

UPDATE customers
   SET email = 'user-' || md5(email) || '@example.invalid',
       name  = 'Customer ' || upper(left(md5(name || ':' || id), 8));
