#!/usr/bin/env python3
"""Writes the gen-*.toml files of this corpus: the sweeps (key lengths, versions, methods,
header counts and sizes, control bytes). Run it here after changing it: python3 generate.py

Each generated case is an ordinary [[case]] row (see README.md), readable and replayable on
its own; only the writing is automated."""

import base64

HOST = "Host: chat.test"
KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = ["Upgrade: websocket", "Connection: Upgrade"]
VERSION = "Sec-WebSocket-Version: 13"
HEADER = "# Written by generate.py: edit that script, not this file.\n"


def literal(text):
    """A TOML literal string for `text` (no escapes of TOML's own: the corpus has its own)."""
    assert "'''" not in text
    if "\n" in text or "'" in text:
        return "'''\n" + text + "\n'''" if "\n" in text else "'''" + text + "'''"
    return "'" + text + "'"


def case(name, status, head=None, raw=None, close=None, why=None):
    out = ["[[case]]", f"name = {literal(name)}"]
    if head is not None:
        out.append("head = " + literal("\n".join(head)))
    if raw is not None:
        out.append("raw = " + literal(raw))
    out.append(f"status = {status}")
    if close is not None:
        out.append(f"close = {'true' if close else 'false'}")
    if why:
        out.append(f"why = {literal(why)}")
    return "\n".join(out) + "\n"


def upgrade(path, key=KEY, version=VERSION, extra=(), method="GET"):
    lines = [f"{method} /ws/{path} HTTP/1.1", HOST, *UPGRADE]
    if key is not None:
        lines.append(key)
    if version is not None:
        lines.append(version)
    lines.extend(extra)
    return lines


def write(name, cases):
    with open(f"gen-{name}.toml", "w") as f:
        f.write(HEADER)
        f.write("\n".join(cases))


def keys():
    cases = []
    why = "RFC 6455 4.2.1: the key is the base64 of 16 bytes"
    for n in range(0, 33):
        key = base64.b64encode(bytes((i * 37 + n) % 256 for i in range(n))).decode()
        status = 101 if n == 16 else 400
        cases.append(case(f"key of {n} bytes", status,
                          upgrade(f"key-{n}", key=f"Sec-WebSocket-Key: {key}"),
                          why=None if n == 16 else why))
    base = "dGhlIHNhbXBsZSBub25jZQ"
    for label, bad in [("dash", "-"), ("underscore", "_"), ("dot", "."), ("bang", "!"),
                       ("star", "*"), ("inner space", " "), ("percent", "%"), ("colon", ":"),
                       ("obs-text", "\\xe9"), ("tab", "\\t")]:
        key = base[:10] + bad + base[11:] + "=="
        cases.append(case(f"key with a {label}", 400,
                          upgrade(f"key-{label.replace(' ', '-')}", key=f"Sec-WebSocket-Key: {key}"),
                          why="not the standard base64 alphabet"))
    for label, key, status in [
        ("no padding", base, 400),
        ("one padding byte", base + "=", 400),
        ("three padding bytes", base + "===", 400),
        ("padding in the middle", base[:4] + "==" + base[4:], 400),
        ("leading spaces", "   " + base + "==", 101),
        ("trailing tab", base + "==\\t", 101),
        ("empty", "", 400),
    ]:
        cases.append(case(f"key: {label}", status,
                          upgrade(f"key-{label.replace(' ', '-')}", key=f"Sec-WebSocket-Key: {key}")))
    cases.append(case("key missing", 400, upgrade("key-missing", key=None)))
    cases.append(case("key sent twice", 400, upgrade("key-twice", extra=[KEY]),
                      why="two keys: which one would the upstream answer?"))
    cases.append(case("two keys in one list", 400,
                      upgrade("key-list", key=f"{KEY}, {KEY.split(': ')[1]}")))
    write("websocket-key", cases)


def versions():
    cases = []
    for value in ["0", "1", "7", "8", "12", "14", "99", "013", "13.0", "+13", "-13", "1 3",
                  "13,13", "13, 8", "8, 13", "thirteen", "", "0x0d", "130"]:
        cases.append(case(f"version {value!r}", 426,
                          upgrade("version", version=f"Sec-WebSocket-Version: {value}"),
                          why="only version 13 is spoken; 426 says so with Sec-WebSocket-Version: 13"))
    for label, value in [("leading space", "  13"), ("trailing spaces", "13  "),
                         ("tabs", "\\t13\\t")]:
        cases.append(case(f"version 13 with {label}", 101,
                          upgrade("version", version=f"Sec-WebSocket-Version: {value}")))
    cases.append(case("version missing", 426, upgrade("version", version=None)))
    cases.append(case("version 13 sent twice", 426, upgrade("version", extra=[VERSION])))
    cases.append(case("versions 13 and 8 on two lines", 426,
                      upgrade("version", extra=["Sec-WebSocket-Version: 8"])))
    write("websocket-version", cases)


def methods():
    cases = []
    for method in ["POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT",
                   "get", "Get", "PRI", "PROPFIND", "FOO"]:
        cases.append(case(f"upgrade with {method}", 405, upgrade("method", method=method),
                          why="a WebSocket upgrade is a GET (RFC 6455 4.1); methods are case-sensitive"))
    for label, line in [("CONNECT authority", "CONNECT chat.test:443 HTTP/1.1"),
                        ("CONNECT path", "CONNECT /http HTTP/1.1"),
                        ("connect lower case", "connect /http HTTP/1.1")]:
        cases.append(case(f"plain {label}", 405, [line, HOST],
                          why="the proxy opens no tunnels to arbitrary hosts"))
    for label, line in [("a parenthesis", "G(T /http HTTP/1.1"),
                        ("a slash", "GE/T /http HTTP/1.1"),
                        ("a NUL", "G\\x00T /http HTTP/1.1"),
                        ("obs-text", "G\\xc9T /http HTTP/1.1"),
                        ("nothing", " /http HTTP/1.1"),
                        ("a tab after it", "GET\\t/http HTTP/1.1"),
                        ("two spaces after it", "GET  /http HTTP/1.1"),
                        ("a space inside", "GE T /http HTTP/1.1"),
                        ("a quote", 'GE"T /http HTTP/1.1'),
                        ("a comma", "GE,T /http HTTP/1.1")]:
        cases.append(case(f"method with {label}", 400, [line, HOST],
                          why="the method is a token followed by one space"))
    write("methods", cases)


def sizes():
    cases = []
    plain = ["GET /http/count HTTP/1.1", HOST]
    for total in [31, 32, 33, 40, 64, 200]:
        extra = [f"X-H{i}: {i}" for i in range(total - 1)]  # Host is the first
        status = 200 if total <= 32 else 431
        cases.append(case(f"plain GET with {total} headers", status, plain + extra,
                          why="limits.max_headers = 32"))
    for total in [32, 33]:
        lines = upgrade("count")
        lines += [f"X-H{i}: {i}" for i in range(total - (len(lines) - 1))]
        cases.append(case(f"upgrade with {total} headers", 101 if total <= 32 else 431, lines))
    cases.append(case("1000 empty headers", 431,
                      raw="GET /http HTTP/1.1\\r\\nHost: chat.test\\r\\n${1000*X:\\r\\n}\\r\\n"))

    # A head of exactly max_request_head bytes passes, one byte more does not.
    def sized(total):
        start = "GET /http/size HTTP/1.1\r\nHost: chat.test\r\nX-Pad: "
        pad = total - len(start) - 4
        return start.replace("\r\n", "\\r\\n") + "${%d*a}" % pad + "\\r\\n\\r\\n"
    cases.append(case("head of 4095 bytes", 200, raw=sized(4095)))
    cases.append(case("head of 4096 bytes", 200, raw=sized(4096),
                      why="limits.max_request_head = 4096, final CRLF included"))
    cases.append(case("head of 4097 bytes", 431, raw=sized(4097)))
    for label, raw in [
        ("a 5000-byte target", "GET /http/${5000*a} HTTP/1.1\\r\\nHost: chat.test\\r\\n\\r\\n"),
        ("a 5000-byte method", "${5000*G} /http HTTP/1.1\\r\\nHost: chat.test\\r\\n\\r\\n"),
        ("a 5000-byte header name", "GET /http HTTP/1.1\\r\\nHost: chat.test\\r\\n${5000*X}: 1\\r\\n\\r\\n"),
        ("a 5000-byte header value", "GET /http HTTP/1.1\\r\\nHost: chat.test\\r\\nX: ${5000*v}\\r\\n\\r\\n"),
        ("a 5000-byte Host", "GET /http HTTP/1.1\\r\\nHost: ${5000*h}.test\\r\\n\\r\\n"),
        ("a 64 KiB line", "GET /http HTTP/1.1\\r\\nX: ${65536*v}\\r\\n\\r\\n"),
        ("a 5000-byte request line without an end", "GET /http/${5000*a}"),
        ("4100 bytes of CRLF", "${2050*\\r\\n}"),
        ("an upgrade with a 5000-byte protocol list",
         "GET /ws/size HTTP/1.1\\r\\nHost: chat.test\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n"
         "Sec-WebSocket-Protocol: ${1000*chat,}\\r\\n\\r\\n"),
    ]:
        cases.append(case(f"head with {label}", 431, raw=raw,
                          why="the head grows past limits.max_request_head"))
    write("sizes", cases)


def control_bytes():
    cases = []
    for byte in ["00", "01", "08", "0b", "0c", "0e", "1b", "1f", "7f"]:
        b = f"\\x{byte}"
        cases.append(case(f"0x{byte} in a header value", 400,
                          ["GET /http HTTP/1.1", HOST, f"X-Ctl: a{b}b"],
                          why="field values are visible ASCII, obs-text, SP and HTAB"))
        cases.append(case(f"0x{byte} in a header name", 400,
                          ["GET /http HTTP/1.1", HOST, f"X-C{b}tl: ab"]))
        cases.append(case(f"0x{byte} in the target", 400,
                          [f"GET /http/a{b}b HTTP/1.1", HOST]))
        cases.append(case(f"0x{byte} in an upgrade's Host", 400,
                          ["GET /ws/ctl HTTP/1.1", f"Host: chat{b}.test", *UPGRADE, KEY, VERSION]))
    for byte, label in [("80", "0x80"), ("ff", "0xff"), ("c3\\xa9", "UTF-8 e-acute")]:
        b = f"\\x{byte}"
        cases.append(case(f"{label} in a header value", 200,
                          ["GET /http HTTP/1.1", HOST, f"X-Obs: caf{b}"],
                          why="obs-text is allowed in field values and passed on"))
        cases.append(case(f"{label} in a header name", 400,
                          ["GET /http HTTP/1.1", HOST, f"X-Caf{b}: 1"]))
        cases.append(case(f"{label} in the target", 400,
                          [f"GET /http/caf{b} HTTP/1.1", HOST],
                          why="a target's bytes beyond ASCII must be percent-encoded"))
    cases.append(case("a tab in a header value", 200, ["GET /http HTTP/1.1", HOST, "X-Tab: a\\tb"]))
    write("control-bytes", cases)


if __name__ == "__main__":
    keys()
    versions()
    methods()
    sizes()
    control_bytes()
