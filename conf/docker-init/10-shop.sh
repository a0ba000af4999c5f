#!/bin/bash
# Run by the postgres image's entrypoint on the first start of an empty data
# directory (mounted at /docker-entrypoint-initdb.d by docker-compose.yml):
# creates the `shop` source database and loads the demo schema into it.
#
# Only `set -e`: the entrypoint sources *.sh files that are not executable, and
# stricter options would then leak into it.
set -e

psql -X -v ON_ERROR_STOP=1 -U postgres -d postgres -c 'CREATE DATABASE shop'
psql -X -v ON_ERROR_STOP=1 -U postgres -d shop -f /demo/demo-shop.sql
