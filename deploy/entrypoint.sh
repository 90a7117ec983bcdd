#!/bin/sh
# The image's entrypoint: `bridge-entrypoint millimetric-bridge serve`.
#
# Fly and Render mount the volume over the data folder at run time, owned by root, which
# hides the image's own chown: the bridge user could not create its SQLite database. So
# the container starts as root, and this script, as root only:
#   1. gives the data folder to the bridge user, and whatever inside is not theirs yet
#      (a file a root shell left there); on a later boot there is nothing to change;
#   2. becomes that user for good (real, effective and saved ids, their groups, no way
#      back through a setuid program) and execs the command, so the server is the
#      container's main process and gets its signals directly.
# The server never runs as root. Started as another user already (`docker run --user`),
# it just execs the command.
#
# BRIDGE_USER (default bridge) and BRIDGE_DATA_DIR (default /data) are set by the Dockerfile.
set -eu

user="${BRIDGE_USER:-bridge}"
data="${BRIDGE_DATA_DIR:-/data}"
[ "$#" -gt 0 ] || set -- millimetric-bridge serve

if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi
if ! uid="$(id -u "$user" 2>/dev/null)"; then
    echo "bridge-entrypoint: BRIDGE_USER: no user named $user" >&2
    exit 2
fi
if [ "$uid" = 0 ]; then
    echo "bridge-entrypoint: BRIDGE_USER: $user is root; the server never runs as root" >&2
    exit 2
fi
gid="$(id -g "$user")"

mkdir -p "$data"
# -h and find's default of not following links: a link inside cannot give away its target.
find "$data" ! -user "$uid" -exec chown -h "$uid:$gid" {} +

exec setpriv --reuid="$uid" --regid="$gid" --init-groups --no-new-privs -- "$@"
