#!/bin/sh
# gen-peers.sh — config management for certmesh with nothing but sh, ssh and jq.
#
#   gen-peers.sh collect INVENTORY.json > nodes.json
#       runs `certmesh id` on every node of the inventory (over $CERTMESH_SSH, default
#       `ssh`) and prints the inventory with each node's device ID added.
#   gen-peers.sh render nodes.json NAME [COMMON.toml] > certmesh.toml
#       prints node NAME's config: [node], [tree], one [[peer]] per other node, then
#       COMMON.toml if given (the [acme], [[certificate]], [[hook]] all nodes share).
#   gen-peers.sh push nodes.json [COMMON.toml]
#       renders every node's config, checks it on the node with `certmesh check`,
#       installs it as /etc/certmesh/certmesh.toml and runs `systemctl reload certmesh`
#       (SIGHUP: the peer list is re-read, no restart).
#
# INVENTORY.json (the only file you edit; adding or removing a node = one entry):
#   { "tree": "/etc/ssl/certmesh", "state_dir": "/var/lib/certmesh",
#     "nodes": [ { "name": "lb0", "host": "root@lb0.backnet",
#                  "address": "[2001:db8::f001]:22000" }, ... ] }
# `address` is where the peers dial the node (ip:port, IPv6 in brackets — host names
# are refused by certmesh); `listen` (default: `address`), `tree`, `state_dir` and
# `config` (default /etc/certmesh/certmesh.toml) and `reload` (default `systemctl
# reload certmesh`) may be set per node (paths without spaces). A node that already
# has an `id` in the inventory is not asked again.
#
# Hub topology (large fleets, see docs/large-fleets.md): give nodes `"hub": true`
# and every node a `"region"`. Then each edge peers with the hubs of its region
# (two is the rule: one can fail), and each hub with every other hub and with the
# edges of its region. Without any hub, every node peers with every other (full mesh).
#
# CERTMESH_SSH is called as `$CERTMESH_SSH HOST COMMAND...` and must, like ssh, run
# the command words with the node's shell; the tests use `shift; exec sh -c "$*"`.
set -eu

SSH=${CERTMESH_SSH:-ssh}

die() {
    echo "gen-peers.sh: $*" >&2
    exit 2
}

command -v jq >/dev/null || die "jq is required (apt-get install jq)"

# The inventory with defaults applied to every node.
normalized() {
    jq -e '
      def need($n; $k): if has($k) and (.[$k] | type) == "string" and .[$k] != ""
        then . else error("node \($n | tojson): missing \($k | tojson)") end;
      . as $top
      | if (.nodes | type) != "array" then error("no \"nodes\" array") else . end
      | .nodes |= map(
          (.name // "?") as $n
          | need($n; "name") | need($n; "address")
          | .listen = (.listen // .address)
          | .tree = (.tree // $top.tree // "/etc/ssl/certmesh")
          | .state_dir = (.state_dir // $top.state_dir // "/var/lib/certmesh")
          | .config = (.config // $top.config // "/etc/certmesh/certmesh.toml")
          | .reload = (.reload // $top.reload // "systemctl reload certmesh")
          | .host = (.host // .name)
          | .hub = (.hub // false)
          | if (.hub | type) != "boolean" then error("node \($n | tojson): hub must be true or false") else . end)
      | if (.nodes | map(.name) | length) != (.nodes | map(.name) | unique | length)
        then error("duplicate node name") else . end
      | if any(.nodes[]; .hub) then
          (.nodes | map(select(.hub) | .region)) as $hubregions
          | .nodes |= map(
              if (.region | type) != "string" or .region == ""
              then error("node \(.name | tojson): hub topology: missing \"region\"")
              elif (.hub | not) and (.region | IN($hubregions[]) | not)
              then error("node \(.name | tojson): no hub in region \(.region | tojson)")
              else . end)
        else . end' "$1" ||
        die "$1: not a usable inventory"
}

collect() {
    inv=$(normalized "$1")
    out=$inv
    names=$(printf '%s' "$inv" | jq -r '.nodes[] | select(has("id") | not) | .name')
    while IFS= read -r name; do
        [ -n "$name" ] || continue
        node=$(printf '%s' "$inv" | jq -c --arg n "$name" '.nodes[] | select(.name == $n)')
        host=$(printf '%s' "$node" | jq -r .host)
        state=$(printf '%s' "$node" | jq -r .state_dir)
        # `certmesh id` prints the device ID as its last line.
        id=$($SSH "$host" certmesh id --state-dir "$state" </dev/null | tail -n 1) ||
            die "node $name ($host): certmesh id failed"
        [ -n "$id" ] || die "node $name ($host): certmesh id printed nothing"
        out=$(printf '%s' "$out" |
            jq --arg n "$name" --arg id "$id" '(.nodes[] | select(.name == $n)).id = $id')
    done <<NAMES
$names
NAMES
    printf '%s\n' "$out"
}

render() {
    nodes=$(normalized "$1")
    printf '%s' "$nodes" | jq -e --arg n "$2" 'any(.nodes[]; .name == $n)' >/dev/null ||
        die "$1: no node named \"$2\""
    printf '%s' "$nodes" | jq -e 'all(.nodes[]; has("id"))' >/dev/null ||
        die "$1: some nodes have no id (run: gen-peers.sh collect)"
    # JSON string escapes are valid TOML basic-string escapes: tojson quotes safely.
    printf '%s' "$nodes" | jq -r --arg n "$2" '
      (.nodes[] | select(.name == $n)) as $me
      | "# Generated by gen-peers.sh for node \($me.name); edit the inventory, not this file.",
        "",
        "[node]",
        "name = \($me.name | tojson)",
        "state_dir = \($me.state_dir | tojson)",
        "listen = \($me.listen | tojson)",
        "",
        "[tree]",
        "path = \($me.tree | tojson)",
        (if any(.nodes[]; .hub) then
           if $me.hub then .nodes[] | select(.name != $n and (.hub or .region == $me.region))
           else .nodes[] | select(.hub and .region == $me.region) end
         else .nodes[] | select(.name != $n) end
          | "", "[[peer]]",
            "name = \(.name | tojson)",
            "id = \(.id | tojson)",
            "address = \(.address | tojson)")'
    if [ $# -ge 3 ]; then
        echo
        cat "$3"
    fi
}

push() {
    nodes=$(normalized "$1")
    names=$(printf '%s' "$nodes" | jq -r '.nodes[].name')
    while IFS= read -r name; do
        [ -n "$name" ] || continue
        node=$(printf '%s' "$nodes" | jq -c --arg n "$name" '.nodes[] | select(.name == $n)')
        host=$(printf '%s' "$node" | jq -r .host)
        cfg=$(printf '%s' "$node" | jq -r .config)
        reload=$(printf '%s' "$node" | jq -r .reload)
        # One string, run by the node's shell (as ssh does with its arguments).
        remote="cat > $cfg.new && certmesh check --config $cfg.new >/dev/null && mv $cfg.new $cfg && $reload"
        if [ $# -ge 2 ]; then
            render "$1" "$name" "$2"
        else
            render "$1" "$name"
        fi | $SSH "$host" "$remote" ||
            die "node $name ($host): config not installed"
        echo "gen-peers.sh: $name: config installed, peers reloaded" >&2
    done <<NAMES
$names
NAMES
}

case "${1:-}" in
collect) [ $# -eq 2 ] || die "usage: gen-peers.sh collect INVENTORY.json"; collect "$2" ;;
render) [ $# -ge 3 ] && [ $# -le 4 ] || die "usage: gen-peers.sh render nodes.json NAME [COMMON.toml]"
    shift; render "$@" ;;
push) [ $# -ge 2 ] && [ $# -le 3 ] || die "usage: gen-peers.sh push nodes.json [COMMON.toml]"
    shift; push "$@" ;;
*) die "usage: gen-peers.sh collect|render|push ... (see the header of this script)" ;;
esac
