# A small NoCloud / ConfigDrive implementation (sourced by rc.sysinit). It copies
# the seed into $RUN/seed, flattens it with yaml2flat/json2flat and applies it.
# What of cloud-init it covers is listed in images/README.md.
SEED=$RUN/seed

# find_label LABEL...: the block device carrying one of the filesystem labels.
find_label() {
	for l in "$@"; do
		d=$(findfs "LABEL=$l" 2>/dev/null) && { echo "$d"; return 0; }
	done
	return 1
}

# insmod returns after the driver's probing (SATA and SCSI scans included: measured,
# sr0 is there when this runs), so a short grace period is only a safety margin for
# a slow SCSI target, not a wait every seedless boot should pay in full.
seed_device() {
	i=0
	while :; do
		find_label cidata CIDATA config-2 CONFIG-2 && return 0
		[ -n "$(ls /sys/class/scsi_host 2>/dev/null)" ] || return 1
		i=$((i + 1)); [ $i -gt 3 ] && return 1
		usleep 100000
	done
}

ci_fetch() {
	mkdir -p "$SEED" /run/virtplane/ds
	dev=$(seed_device) || return 1
	mount -o ro "$dev" /run/virtplane/ds 2>/dev/null || return 1
	d=/run/virtplane/ds
	if [ -d $d/openstack ]; then
		echo configdrive > "$SEED/source"
		o=$d/openstack/latest
		[ -f $o/meta_data.json ] && cp $o/meta_data.json "$SEED/meta-data"
		[ -f $o/user_data ] && cp $o/user_data "$SEED/user-data"
		[ -f $o/network_data.json ] && cp $o/network_data.json "$SEED/network_data.json"
	else
		echo nocloud > "$SEED/source"
		for f in meta-data user-data network-config vendor-data; do
			[ -f $d/$f ] && cp $d/$f "$SEED/$f"
		done
	fi
	umount /run/virtplane/ds
	say "cloud-init datasource $(cat "$SEED/source") on ${dev##*/}"
	return 0
}

ci_parse() {
	M=$SEED/meta.flat U=$SEED/user.flat N=$SEED/network.flat
	: > "$M"; : > "$U"; : > "$N"
	[ -f "$SEED/meta-data" ] && flatten "$SEED/meta-data" > "$M"
	UD_KIND=none
	if [ -f "$SEED/user-data" ]; then
		case "$(head -n 1 "$SEED/user-data")" in
		'#!'*) UD_KIND=script ;;
		'#cloud-config'*) UD_KIND=config; flatten "$SEED/user-data" > "$U" ;;
		*) UD_KIND=unsupported ;;
		esac
	fi
	[ -f "$SEED/network-config" ] && flatten "$SEED/network-config" | sed 's/^network\.//' > "$N"
	if [ -f "$SEED/network_data.json" ]; then
		flatten "$SEED/network_data.json" > "$SEED/nd.flat"
		ci_openstack_network
	fi
	# ConfigDrive names the id "uuid" (KubeVirt also sets instance_id); NoCloud "instance-id".
	IID=$(yget "$M" instance-id)
	[ -z "$IID" ] && IID=$(yget "$M" uuid)
	[ -z "$IID" ] && IID=$(yget "$M" instance_id)
	[ -z "$IID" ] && IID=iid-none
	echo "$IID" > "$SEED/instance-id"
}

# OpenStack network_data.json (links + networks of type ipv4) to a v1 config.
ci_openstack_network() {
	F=$SEED/nd.flat
	for i in $(ykeys "$F" networks); do
		[ "$(yget "$F" networks.$i.type)" = ipv4 ] || continue
		link=$(yget "$F" networks.$i.link)
		for j in $(ykeys "$F" links); do
			[ "$(yget "$F" links.$j.id)" = "$link" ] || continue
			echo "config.$i.type=physical"
			echo "config.$i.mac_address=$(yget "$F" links.$j.ethernet_mac_address)"
		done
		echo "config.$i.subnets.0.type=static"
		echo "config.$i.subnets.0.address=$(yget "$F" networks.$i.ip_address)"
		echo "config.$i.subnets.0.netmask=$(yget "$F" networks.$i.netmask)"
		for k in $(ykeys "$F" networks.$i.routes); do
			[ "$(yget "$F" networks.$i.routes.$k.network)" = 0.0.0.0 ] &&
				echo "config.$i.subnets.0.gateway=$(yget "$F" networks.$i.routes.$k.gateway)"
		done
	done >> "$N"
}

set_password() {  # user password (plain text, or a crypt hash starting with $)
	case "$2" in
	'$'*) h=$2 ;;
	*) h=$(mkpasswd -m sha512 "$2") ;;
	esac
	awk -F: -v u="$1" -v h="$h" 'BEGIN { OFS = ":" } $1 == u { $2 = h } { print }' /etc/shadow > /etc/shadow.new
	cat /etc/shadow.new > /etc/shadow && rm -f /etc/shadow.new
}

add_user() {  # user: create it with a home, unless it exists
	grep -q "^$1:" /etc/passwd && return 0
	uid=$(awk -F: 'BEGIN { m = 999 } $3 > m && $3 < 60000 { m = $3 } END { print m + 1 }' /etc/passwd)
	echo "$1:x:$uid:$uid::/home/$1:/bin/sh" >> /etc/passwd
	echo "$1:x:$uid:" >> /etc/group
	echo "$1:!:0:0:99999:7:::" >> /etc/shadow
	mkdir -p "/home/$1" && chown "$uid:$uid" "/home/$1"
}

add_keys() {  # user, then keys on stdin
	home=$(awk -F: -v u="$1" '$1 == u { print $6 }' /etc/passwd)
	[ -n "$home" ] || return 0
	mkdir -p "$home/.ssh"
	grep -v '^$' >> "$home/.ssh/authorized_keys"
	chmod 700 "$home/.ssh"; chmod 600 "$home/.ssh/authorized_keys"
	chown -R "$(awk -F: -v u="$1" '$1 == u { print $3 ":" $4 }' /etc/passwd)" "$home/.ssh"
}

# Everything that is state of this boot only (the root filesystem is a fresh
# initramfs every time): hostname, users, keys, passwords, files.
ci_apply() {
	h=$(yget "$U" hostname)
	[ -z "$h" ] && h=$(yget "$U" fqdn | cut -d. -f1)
	[ -z "$h" ] && h=$(yget "$M" local-hostname)
	[ -z "$h" ] && h=$(yget "$M" hostname)
	[ -z "$h" ] && h=$(yget "$M" name)
	h=${h%%.*}
	if [ -n "$h" ]; then
		hostname "$h"; echo "$h" > /etc/hostname
		echo "127.0.1.1 $h" >> /etc/hosts
		say "hostname $h"
	fi

	# The cloud image's "default user" is root; "user:" and "users:" add more.
	default=root
	u=$(yget "$U" user)
	[ -n "$u" ] && [ "$u" != root ] && { add_user "$u"; default=$u; }
	{
		ylist "$U" ssh_authorized_keys
		ylist "$M" public-keys
		yget "$M" public-keys
		for k in $(ykeys "$M" public_keys); do yget "$M" public_keys.$k; done
	} | add_keys root
	[ "$default" != root ] && ylist "$U" ssh_authorized_keys | add_keys "$default"
	for i in $(ykeys "$U" users); do
		n=$(yget "$U" users.$i.name)
		[ -z "$n" ] && n=$(yget "$U" users.$i)
		[ -z "$n" ] || [ "$n" = default ] && continue
		add_user "$n"
		{ ylist "$U" users.$i.ssh_authorized_keys; ylist "$U" users.$i.ssh-authorized-keys; } | add_keys "$n"
		p=$(yget "$U" users.$i.plain_text_passwd); [ -n "$p" ] && set_password "$n" "$p"
		p=$(yget "$U" users.$i.passwd); [ -n "$p" ] && set_password "$n" "$p"
	done

	p=$(yget "$U" password)
	[ -n "$p" ] && set_password "$default" "$p"
	for l in $(yget "$U" chpasswd.list; ylist "$U" chpasswd.list); do
		case "$l" in *:*) set_password "${l%%:*}" "${l#*:}" ;; esac
	done
	for i in $(ykeys "$U" chpasswd.users); do
		set_password "$(yget "$U" chpasswd.users.$i.name)" "$(yget "$U" chpasswd.users.$i.password)"
	done

	for i in $(ykeys "$U" write_files); do
		f=$(yget "$U" write_files.$i.path)
		[ -n "$f" ] || continue
		mkdir -p "$(dirname "$f")"
		if [ "$(yget "$U" write_files.$i.append)" = true ]; then
			yget "$U" write_files.$i.content >> "$f"
		else
			yget "$U" write_files.$i.content > "$f"
		fi
		m=$(yget "$U" write_files.$i.permissions); [ -n "$m" ] && chmod "$m" "$f"
	done
}

# cmdscript PATH: a list of commands (strings, or argv lists) as a shell script.
cmdscript() {
	echo '#!/bin/sh'
	for i in $(ykeys "$U" "$1"); do
		s=$(yget "$U" "$1.$i")
		if [ -n "$s" ]; then
			echo "$s"
		else
			ylist "$U" "$1.$i" | awk '{ gsub(/'\''/, "'\''\\'\'''\''"); printf "%s'\''%s'\''", (NR > 1 ? " " : ""), $0 } END { print "" }'
		fi
	done
}

ci_bootcmd() {
	[ -n "$(ykeys "$U" bootcmd)" ] || return 0
	cmdscript bootcmd > "$RUN/bootcmd.sh"
	sh "$RUN/bootcmd.sh" >> /var/log/cloud-init-output.log 2>&1
}

# Per-instance work (user-data script, runcmd) runs once per instance-id: the
# marker lives on the disk's state partition when there is one, so a reboot of the
# same VM does not run it again but a new instance-id (a new VM) does.
ci_final() {
	done_iid=$(cat "$STATE/instance-id.done" 2>/dev/null)
	if [ "$done_iid" = "$IID" ]; then
		say "cloud-init per-instance steps already done for $IID"
		return 0
	fi
	mkdir -p "$STATE/scripts"
	case "$UD_KIND" in
	script)
		cp "$SEED/user-data" "$STATE/scripts/user-data"
		chmod 700 "$STATE/scripts/user-data"
		"$STATE/scripts/user-data" >> /var/log/cloud-init-output.log 2>&1
		say "cloud-init user-data script exit $?"
		;;
	config)
		if [ -n "$(ykeys "$U" runcmd)" ]; then
			cmdscript runcmd > "$STATE/scripts/runcmd"
			chmod 700 "$STATE/scripts/runcmd"
			sh "$STATE/scripts/runcmd" >> /var/log/cloud-init-output.log 2>&1
			say "cloud-init runcmd exit $?"
		fi
		;;
	esac
	echo "$IID" > "$STATE/instance-id.done"
	sync
}
