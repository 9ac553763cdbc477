# Flattens the YAML subset that cloud-init documents use into "path=value" lines,
# for busybox awk (no gawk extensions). The guest has no YAML library, and the shell
# can then answer "what is runcmd.0" with a grep. The subset is documented in
# images/README.md: block mappings and sequences by indentation, "- key: v" items,
# flow [a, b] and {k: v} on one line, '...'/"..." scalars, | and > block scalars
# (one output line per text line, same path), and comments. Anchors, tags and
# multi-document streams are not supported.
#
# Paths join keys with "." and sequence items by index: runcmd.0, users.1.name.

function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t\r]+$/, "", s); return s }

function join(p, k) { return p == "" ? k : p "." k }

# Drops a trailing " # comment" that is outside quotes.
function strip_comment(s,    i, c, q) {
	q = ""
	for (i = 1; i <= length(s); i++) {
		c = substr(s, i, 1)
		if (q != "") { if (c == q) q = ""; continue }
		if (c == "'" || c == "\"") { q = c; continue }
		if (c == "#" && (i == 1 || substr(s, i - 1, 1) ~ /[ \t]/)) return substr(s, 1, i - 1)
	}
	return s
}

function unquote(s,    t) {
	s = trim(s)
	if (s ~ /^'.*'$/) { t = substr(s, 2, length(s) - 2); gsub(/''/, "'", t); return t }
	if (s ~ /^".*"$/) {
		t = substr(s, 2, length(s) - 2)
		gsub(/\\"/, "\"", t); gsub(/\\n/, "\n", t); gsub(/\\t/, "\t", t); gsub(/\\\\/, "\\", t)
		return t
	}
	if (s == "~" || s == "null") return ""
	return s
}

# Position of the ": " (or trailing ":") that ends a mapping key, outside quotes; 0 if none.
function key_end(s,    i, c, q) {
	q = ""
	for (i = 1; i <= length(s); i++) {
		c = substr(s, i, 1)
		if (q != "") { if (c == q) q = ""; continue }
		if (i == 1 && (c == "'" || c == "\"")) { q = c; continue }
		if (c == ":" && (i == length(s) || substr(s, i + 1, 1) ~ /[ \t]/)) return i
		if (c == "[" || c == "{") return 0
	}
	return 0
}

# Splits a one-line flow collection body on commas outside quotes into parts[].
function split_flow(body, parts,    i, c, q, n, cur) {
	n = 0; cur = ""; q = ""
	for (i = 1; i <= length(body); i++) {
		c = substr(body, i, 1)
		if (q != "") { if (c == q) q = ""; cur = cur c; continue }
		if (c == "'" || c == "\"") { q = c; cur = cur c; continue }
		if (c == ",") { parts[++n] = cur; cur = ""; continue }
		cur = cur c
	}
	if (trim(cur) != "") parts[++n] = cur
	return n
}

function emit(path, v) { print path "=" v }

function value(path, v,    parts, n, i, k, e) {
	v = trim(v)
	if (v ~ /^\[.*\]$/) {
		n = split_flow(substr(v, 2, length(v) - 2), parts)
		for (i = 1; i <= n; i++) emit(join(path, i - 1), unquote(parts[i]))
		return
	}
	if (v ~ /^\{.*\}$/) {
		n = split_flow(substr(v, 2, length(v) - 2), parts)
		for (i = 1; i <= n; i++) {
			e = key_end(trim(parts[i]))
			if (e == 0) continue
			k = unquote(substr(trim(parts[i]), 1, e - 1))
			emit(join(path, k), unquote(substr(trim(parts[i]), e + 1)))
		}
		return
	}
	emit(path, unquote(v))
}

# Handles "key: value" / "key:" / "key: |" found at column ind inside the top frame.
function mapping(line, ind,    e, k, v) {
	e = key_end(line)
	k = unquote(substr(line, 1, e - 1))
	v = trim(substr(line, e + 1))
	if (v == "") { pending = join(fpath[top], k); pending_ind = ind; return }
	if (v ~ /^[|>][-+0-9]*$/) { block = join(fpath[top], k); block_min = ind + 1; block_ind = -1; return }
	value(join(fpath[top], k), v)
}

function push(ind, path, kind) { top++; find[top] = ind; fpath[top] = path; fkind[top] = kind; fn[top] = 0 }

BEGIN { top = 0; find[0] = -1; fpath[0] = ""; fkind[0] = "map"; fn[0] = 0; pending = ""; block = "" }

{
	raw = $0
	sub(/\r$/, "", raw)
	match(raw, /^ */)
	ind = RLENGTH

	if (block != "") {
		if (trim(raw) == "") { if (block_ind >= 0) emit(block, ""); next }
		if (ind >= block_min) {
			if (block_ind < 0) block_ind = ind
			emit(block, substr(raw, block_ind + 1))
			next
		}
		block = ""
	}

	line = trim(strip_comment(raw))
	if (line == "" || line == "---" || line == "...") next

	seqitem = (line ~ /^-( |$)/)
	while (top > 0 && (find[top] > ind || (find[top] == ind && fkind[top] == "seq" && !seqitem))) top--
	# A "- item" may sit at the same indentation as the key that owns the list.
	if (pending != "") {
		if (ind > pending_ind || (ind == pending_ind && seqitem)) push(ind, pending, seqitem ? "seq" : "map")
		pending = ""
	}

	if (seqitem) {
		if (fkind[top] != "seq") next
		path = join(fpath[top], fn[top]++)
		rest = trim(substr(line, 2))
		if (rest == "") { pending = path; pending_ind = ind; next }
		if (key_end(rest) > 0) {
			# "- key: v" starts a mapping whose keys line up after the dash.
			push(ind + index(substr(raw, ind + 2), rest), path, "map")
			mapping(rest, find[top])
			next
		}
		value(path, rest)
		next
	}
	if (key_end(line) > 0) { mapping(line, ind); next }
}
