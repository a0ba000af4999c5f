#!/bin/sh
# Regenerates the seed corpus in seeds/startup/: whole client first packets,
# length word included, as a client writes them on a fresh connection.
set -eu
cd "$(dirname "$0")/startup"

# packet NAME BODY-PRINTF-FORMAT: writes the length word (it counts itself) + body.
packet() {
    name=$1
    shift
    printf "$@" > "$name.body"
    len=$(( $(wc -c < "$name.body") + 4 ))
    printf "$(printf '\\%03o\\%03o\\%03o\\%03o' \
        $(( len >> 24 & 255 )) $(( len >> 16 & 255 )) $(( len >> 8 & 255 )) $(( len & 255 )))" > "$name"
    cat "$name.body" >> "$name"
    rm "$name.body"
}

# StartupMessage 3.0 (196608 = 0x00030000).
packet startup-3.0 '\000\003\000\000user\000app\000database\000shop.pr-1\000application_name\000psql\000\000'
# SSLRequest (80877103 = 0x04d2162f), GSSENCRequest (80877104 = 0x04d21630).
packet ssl-request '\004\322\026\057'
packet gssenc-request '\004\322\026\060'
# CancelRequest (80877102 = 0x04d2162e), pid 4242, secret 0xdeadbeef.
packet cancel-request '\004\322\026\056\000\000\020\222\336\255\276\357'
# StartupMessage 3.2 with a protocol option the proxy must not forward.
packet startup-3.2-pq '\000\003\000\002user\000app.pr-7\000database\000shop\000_pq_.test_option\000on\000options\000-c search_path=x\000\000'
