#!/bin/sh
# Builds the .deb with cargo-deb and checks it: contents, conffile, maintainer scripts,
# and `systemd-analyze verify` of the unit. Run by .ci/run; also by hand:
#   packaging/check-deb.sh              build + static checks
#   packaging/check-deb.sh --install    also dpkg -i it (twice): user, group, state
#                                       dir, identity kept across reinstalls
#   packaging/check-deb.sh --install --purge   ... then dpkg --purge it again
set -eu
cd "$(dirname "$0")/.."

INSTALL=0
PURGE=0
for a in "$@"; do
    case "$a" in
    --install) INSTALL=1 ;;
    --purge) PURGE=1 ;;
    *) echo "usage: $0 [--install [--purge]]" >&2; exit 2 ;;
    esac
done

fail() {
    echo "check-deb: FAIL: $*" >&2
    exit 1
}
ok() { echo "check-deb: ok: $*"; }

command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
command -v systemd-analyze >/dev/null || fail "systemd-analyze missing (apt-get install systemd)"

# Man pages and shell completions come from the clap definitions of the binary
# being packaged (the assets listed in Cargo.toml's [package.metadata.deb]).
cargo build --release
packaging/gen-assets.sh target/release/certmesh target/assets
cargo deb --strip   # release profile keeps debuginfo for benchmarks; the package does not need it
DEB=$(ls -t target/debian/certmesh_*.deb | head -n 1)
[ -f "$DEB" ] || fail "cargo deb produced no target/debian/certmesh_*.deb"
ok "built $DEB"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Contents: binary, unit, conffile.
dpkg-deb -c "$DEB" >"$WORK/contents"
grep -q ' \./usr/bin/certmesh$' "$WORK/contents" || fail "no /usr/bin/certmesh in $DEB"
UNIT=$(grep -o '\./\(usr/\)\?lib/systemd/system/certmesh\.service$' "$WORK/contents" | head -n 1)
[ -n "$UNIT" ] || fail "no certmesh.service under /lib/systemd/system in $DEB"
grep -q ' \./etc/certmesh/certmesh\.toml$' "$WORK/contents" || fail "no /etc/certmesh/certmesh.toml"
ok "contents: /usr/bin/certmesh, ${UNIT#.}, /etc/certmesh/certmesh.toml"
for f in usr/share/man/man1/certmesh.1 usr/share/man/man1/certmesh-run.1 \
    usr/share/man/man5/certmesh.toml.5 \
    usr/share/bash-completion/completions/certmesh \
    usr/share/doc/certmesh/README.md usr/share/doc/certmesh/docs/acme.md \
    usr/share/doc/certmesh/docs/security.md usr/share/doc/certmesh/BENCHMARKS.md \
    usr/share/zsh/vendor-completions/_certmesh \
    usr/share/fish/vendor_completions.d/certmesh.fish; do
    grep -q " \./$f\(\.gz\)\?\$" "$WORK/contents" || fail "no /$f in $DEB"
done
ok "contents: man pages, bash/zsh/fish completions"

# Control: conffile, maintainer scripts with our steps and the systemd snippets.
dpkg-deb -I "$DEB" >"$WORK/info"
mkdir "$WORK/control"
dpkg-deb -e "$DEB" "$WORK/control"
grep -qx '/etc/certmesh/certmesh.toml' "$WORK/control/conffiles" ||
    fail "/etc/certmesh/certmesh.toml is not a conffile"
for s in postinst postrm prerm; do
    [ -x "$WORK/control/$s" ] || fail "no $s maintainer script"
    sh -n "$WORK/control/$s" || fail "$s: shell syntax"
done
grep -q 'certmesh init --state-dir' "$WORK/control/postinst" || fail "postinst does not create the identity"
grep -q 'adduser .*--system' "$WORK/control/postinst" || fail "postinst does not create the user"
grep -q 'deb-systemd-helper' "$WORK/control/postinst" || fail "postinst does not enable the unit"
grep -q '#DEBHELPER#' "$WORK/control/postinst" && fail "postinst still holds the #DEBHELPER# token"
ok "control: conffile, postinst (user, state dir, identity, enable/start), prerm, postrm"

# The unit as packaged, with ExecStart pointing at the built binary (verify needs it).
dpkg-deb --fsys-tarfile "$DEB" | tar -xOf - "$UNIT" >"$WORK/packaged.service"
cmp -s "$WORK/packaged.service" packaging/certmesh.service ||
    fail "the packaged unit differs from packaging/certmesh.service"
mkdir "$WORK/unit"
dpkg-deb --fsys-tarfile "$DEB" | tar -xOf - ./usr/bin/certmesh >"$WORK/certmesh"
chmod 755 "$WORK/certmesh"
sed "s#/usr/bin/certmesh#$WORK/certmesh#" packaging/certmesh.service >"$WORK/unit/certmesh.service"
systemd-analyze verify "$WORK/unit/certmesh.service" || fail "systemd-analyze verify"
ok "systemd-analyze verify certmesh.service"
# The optional socket unit (holds [http] listen across restarts), verified with the
# service it activates.
SOCKET=$(grep -o '\./\(usr/\)\?lib/systemd/system/certmesh-http\.socket$' "$WORK/contents" | head -n 1)
[ -n "$SOCKET" ] || fail "no certmesh-http.socket under /lib/systemd/system in $DEB"
dpkg-deb --fsys-tarfile "$DEB" | tar -xOf - "$SOCKET" >"$WORK/unit/certmesh-http.socket"
cmp -s "$WORK/unit/certmesh-http.socket" packaging/certmesh-http.socket ||
    fail "the packaged socket unit differs from packaging/certmesh-http.socket"
systemd-analyze verify "$WORK/unit/certmesh-http.socket" "$WORK/unit/certmesh.service" ||
    fail "systemd-analyze verify certmesh-http.socket"
ok "systemd-analyze verify certmesh-http.socket"
# `check` wants the tree and an identity: the shipped paths, moved into $WORK.
"$WORK/certmesh" init --state-dir "$WORK/check-state" >/dev/null || fail "init for check"
mkdir "$WORK/check-tree"
sed -e "s#/var/lib/certmesh#$WORK/check-state#g" -e "s#/etc/ssl/certmesh#$WORK/check-tree#g" \
    packaging/certmesh.toml >"$WORK/check.toml"
"$WORK/certmesh" check --config "$WORK/check.toml" >/dev/null || fail "shipped config"
ok "the shipped /etc/certmesh/certmesh.toml passes certmesh check"

# The packaged man page and completions are those of the packaged binary.
mkdir "$WORK/fs"
dpkg-deb -x "$DEB" "$WORK/fs"
MAN="$WORK/fs/usr/share/man/man1/certmesh.1"
[ -f "$MAN.gz" ] && gzip -dc "$MAN.gz" >"$WORK/certmesh.1" || cp "$MAN" "$WORK/certmesh.1"
grep -q '^\.TH certmesh 1' "$WORK/certmesh.1" || fail "certmesh.1 is not a man page"
if command -v man >/dev/null; then
    MANWIDTH=80 man -l "$WORK/certmesh.1" 2>/dev/null | grep -q 'status' || fail "man -l certmesh.1"
fi
"$WORK/certmesh" completions bash | cmp -s - "$WORK/fs/usr/share/bash-completion/completions/certmesh" ||
    fail "the bash completions are not those of the packaged binary"
bash -n "$WORK/fs/usr/share/bash-completion/completions/certmesh" || fail "bash completions: syntax"
if command -v zsh >/dev/null; then zsh -n "$WORK/fs/usr/share/zsh/vendor-completions/_certmesh" || fail "zsh completions: syntax"; fi
if command -v fish >/dev/null; then fish -n "$WORK/fs/usr/share/fish/vendor_completions.d/certmesh.fish" || fail "fish completions: syntax"; fi
ok "man page certmesh(1) and completions match the packaged binary"

[ "$INSTALL" = 1 ] || exit 0

# Install for real (a throwaway machine: CI's container). Works without systemd as
# PID 1: the unit is enabled, starting it is skipped.
dpkg -i "$DEB" >"$WORK/dpkg.log" 2>&1 || { cat "$WORK/dpkg.log"; fail "dpkg -i"; }
getent passwd certmesh >/dev/null || fail "no certmesh user"
getent group ssl-cert >/dev/null || fail "no ssl-cert group"
[ "$(stat -c '%a %U' /var/lib/certmesh)" = "700 certmesh" ] ||
    fail "/var/lib/certmesh is $(stat -c '%a %U' /var/lib/certmesh), want 700 certmesh"
[ "$(stat -c '%U:%G' /etc/ssl/certmesh)" = "certmesh:ssl-cert" ] || fail "/etc/ssl/certmesh owner"
ID=$(certmesh id --state-dir /var/lib/certmesh) || fail "no identity after install"
grep -q "$ID" "$WORK/dpkg.log" || fail "postinst did not print the device ID"
[ "$(stat -c '%U %a' /var/lib/certmesh/node-key.pem)" = "certmesh 600" ] || fail "key owner/mode"
[ -L /etc/systemd/system/multi-user.target.wants/certmesh.service ] || fail "unit not enabled"
systemd-analyze verify "${UNIT#.}" || fail "installed unit: systemd-analyze verify"
ok "installed: user certmesh, group ssl-cert, state dir 0700, identity $ID, unit enabled"

# Reinstall: postinst runs again; init must keep the identity.
dpkg -i "$DEB" >"$WORK/dpkg.log" 2>&1 || { cat "$WORK/dpkg.log"; fail "second dpkg -i"; }
[ "$(certmesh id --state-dir /var/lib/certmesh)" = "$ID" ] || fail "reinstall changed the device ID"
ok "reinstall kept device ID $ID"

if [ "$PURGE" = 1 ]; then
    dpkg --purge certmesh >/dev/null
    [ ! -e /var/lib/certmesh ] || fail "purge left /var/lib/certmesh"
    ok "purged"
fi
