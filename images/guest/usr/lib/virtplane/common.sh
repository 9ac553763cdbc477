# Shared helpers for the guest's boot scripts (sourced, busybox sh).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
VP=/usr/lib/virtplane
RUN=/run/virtplane
STATE=/var/lib/virtplane

# Everything a host-side watcher keys on goes to the serial console with one prefix.
say() { echo "virtplane-guest: $*" > /dev/console; }

# yget FILE PATH: every value stored at PATH in a flattened (path=value) file.
yget() { [ -f "$1" ] && awk -v k="$2=" 'index($0, k) == 1 { print substr($0, length(k) + 1) }' "$1"; }

# ykeys FILE PREFIX: the distinct next path components below PREFIX.
ykeys() {
	[ -f "$1" ] && awk -v p="$2." 'index($0, p) == 1 {
		r = substr($0, length(p) + 1); sub(/[.=].*/, "", r); if (!(r in seen)) { seen[r] = 1; print r } }' "$1"
}

# ylist FILE PATH: the scalar items of the list at PATH (PATH.0, PATH.1, ...), in order.
ylist() {
	[ -f "$1" ] && awk -v p="$2." 'index($0, p) == 1 {
		r = substr($0, length(p) + 1); i = index(r, "=")
		if (i > 1 && substr(r, 1, i - 1) ~ /^[0-9]+$/) print substr(r, i + 1) }' "$1"
}

# flatten FILE: YAML or JSON into path=value lines on stdout.
flatten() {
	if [ "$(tr -d ' \t\r\n' < "$1" | head -c 1)" = "{" ]; then
		awk -f $VP/json2flat.awk "$1"
	else
		awk -f $VP/yaml2flat.awk "$1"
	fi
}

# Physical NICs only: virtual ones (lo, bridges) have no backing device.
nics() {
	for n in /sys/class/net/*; do
		[ -e "$n/device" ] && echo "${n##*/}"
	done
}
