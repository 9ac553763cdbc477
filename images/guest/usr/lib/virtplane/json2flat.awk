# Flattens a JSON document into the same "path=value" lines as yaml2flat.awk, for
# busybox awk. ConfigDrive's meta_data.json/network_data.json and JSON-style NoCloud
# meta-data go through here. Strings keep their text (\" \\ \/ \n \t \uXXXX for
# ASCII only); numbers, true/false are printed as written; null prints empty.

function join(p, k) { return p == "" ? k : p "." k }

# Path of the value about to be read in the current container.
function slot() { return kind[depth] == "[" ? join(path[depth], idx[depth]) : join(path[depth], key[depth]) }

function after_value() { if (kind[depth] == "[") idx[depth]++; else want_key[depth] = 1 }

function read_string(    c, s, h) {
	s = ""
	pos++  # opening quote
	while (pos <= n) {
		c = substr(doc, pos, 1)
		if (c == "\"") { pos++; return s }
		if (c == "\\") {
			pos++; c = substr(doc, pos, 1)
			if (c == "n") s = s "\n"
			else if (c == "t") s = s "\t"
			else if (c == "r") s = s "\r"
			else if (c == "b" || c == "f") s = s
			else if (c == "u") {
				h = substr(doc, pos + 1, 4); pos += 4
				s = s (h ~ /^00[2-7][0-9a-fA-F]$/ ? sprintf("%c", hex(h)) : "?")
			} else s = s c
			pos++
			continue
		}
		s = s c
		pos++
	}
	return s
}

function hex(h,    i, v) {
	v = 0
	for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789abcdef", tolower(substr(h, i, 1))) - 1
	return v
}

{ doc = doc $0 "\n" }

END {
	n = length(doc); pos = 1; depth = 0; kind[0] = ""; path[0] = ""
	while (pos <= n) {
		c = substr(doc, pos, 1)
		if (c ~ /[ \t\r\n,:]/) { pos++; continue }
		if (c == "{" || c == "[") {
			p = depth == 0 ? "" : slot()
			depth++; kind[depth] = c; path[depth] = p; idx[depth] = 0; want_key[depth] = (c == "{")
			pos++
			continue
		}
		if (c == "}" || c == "]") { depth--; pos++; if (depth > 0) after_value(); continue }
		if (c == "\"") {
			s = read_string()
			if (kind[depth] == "{" && want_key[depth]) { key[depth] = s; want_key[depth] = 0; continue }
			print slot() "=" s
			after_value()
			continue
		}
		# Bare literal: number, true, false, null.
		tok = ""
		while (pos <= n && index(" \t\r\n,]}:", substr(doc, pos, 1)) == 0) { tok = tok substr(doc, pos, 1); pos++ }
		if (depth > 0) { print slot() "=" (tok == "null" ? "" : tok); after_value() }
	}
}
