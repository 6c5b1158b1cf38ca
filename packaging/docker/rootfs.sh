#!/bin/sh
# Assemble the file tree of postern's runtime image from a built binary: the binary (also as
# /usr/sbin/sendmail), the shared libraries it links against and the dynamic loader (copied
# from this system, so build on the Debian release the image should match), the CA
# certificates, and passwd/group entries for the postern user. No shell, no package manager.
#
# usage: packaging/docker/rootfs.sh BINARY OUTDIR
#   OUTDIR/root/   root-owned files, copied to / as they are
#   OUTDIR/spool/  and OUTDIR/state/: empty 0700 directories, copied with --chown to
#                  /var/spool/postern and /var/lib/postern (the image's volumes)
set -eu
bin=$1
out=$2
uid=10025

[ -x "$bin" ] || { echo "rootfs.sh: $bin is not an executable" >&2; exit 1; }
[ -f /etc/ssl/certs/ca-certificates.crt ] || {
  echo "rootfs.sh: /etc/ssl/certs/ca-certificates.crt missing (apt-get install ca-certificates)" >&2
  exit 1
}
rm -rf "$out"
mkdir -p "$out/root/usr/bin" "$out/root/usr/sbin" "$out/root/etc/ssl/certs" \
  "$out/root/tmp" "$out/spool" "$out/state"
chmod 1777 "$out/root/tmp"
chmod 0700 "$out/spool" "$out/state"
install -m 0755 "$bin" "$out/root/usr/bin/postern"
ln -s ../bin/postern "$out/root/usr/sbin/sendmail"

# Every absolute path ldd prints: the libraries and the loader.
for lib in $(ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'); do
  mkdir -p "$out/root$(dirname "$lib")"
  cp -L "$lib" "$out/root$lib"
done

cp -L /etc/ssl/certs/ca-certificates.crt "$out/root/etc/ssl/certs/ca-certificates.crt"
cat > "$out/root/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/usr/sbin/nologin
postern:x:$uid:$uid:postern SMTP relay:/var/lib/postern:/usr/sbin/nologin
PASSWD
cat > "$out/root/etc/group" <<GROUP
root:x:0:
postern:x:$uid:
GROUP
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$out/root/etc/nsswitch.conf"
