#!/usr/bin/env python3
"""Send one large message over plain SMTP, streaming the body (the client never holds it).

    send_big.py HOST PORT SIZE_MB [--mime] [--from ADDRESS]

The body is SIZE_MB MiB of 78-byte CRLF lines (no line starts with '.', so no dot-stuffing
is needed). With --mime the message is multipart/mixed: a short text part and one base64
attachment (`big.bin`, 76-character lines) making up the SIZE_MB MiB, as a scanner's PDF
would be; this is what the Graph transport has to split (its text alone must fit in one
Graph request). Exits 0 only if the server answers 250 to the end of DATA; prints the reply
and the time taken.
"""
import socket
import sys
import time


def main():
    host, port, size_mb = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    opts = sys.argv[4:]
    mime = "--mime" in opts
    sender = opts[opts.index("--from") + 1] if "--from" in opts else "from@example.com"
    s = socket.create_connection((host, port), timeout=300)
    f = s.makefile("rb")

    def reply():
        lines = []
        while True:
            line = f.readline()
            if not line:
                raise SystemExit("send_big: connection closed")
            lines.append(line.decode(errors="replace").rstrip())
            if len(line) < 4 or line[3:4] != b"-":
                return int(lines[-1][:3]), " | ".join(lines)

    def cmd(c, want):
        s.sendall(c.encode() + b"\r\n")
        code, text = reply()
        if code != want:
            raise SystemExit(f"send_big: {c!r} -> {text}")
        return text

    code, text = reply()
    if code != 220:
        raise SystemExit(f"send_big: greeting {text}")
    cmd("EHLO bench.example", 250)
    cmd(f"MAIL FROM:<{sender}>", 250)
    cmd("RCPT TO:<to@example.org>", 250)
    cmd("DATA", 354)
    t0 = time.monotonic()
    s.sendall(f"From: <{sender}>\r\nTo: <to@example.org>\r\n".encode() +
              b"Subject: big\r\n")
    if mime:
        s.sendall(b"MIME-Version: 1.0\r\n"
                  b"Content-Type: multipart/mixed; boundary=\"bench-boundary\"\r\n\r\n"
                  b"--bench-boundary\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
                  b"--bench-boundary\r\nContent-Type: application/octet-stream; name=\"big.bin\"\r\n"
                  b"Content-Disposition: attachment; filename=\"big.bin\"\r\n"
                  b"Content-Transfer-Encoding: base64\r\n\r\n")
        # 57 bytes of content per 76-character base64 line.
        line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    else:
        s.sendall(b"\r\n")
        line = b"x" * 76 + b"\r\n"
    block = line * (1024 * 1024 // len(line))
    total = int(size_mb * 1024 * 1024)
    sent = 0
    while sent < total:
        s.sendall(block)
        sent += len(block)
    if mime:
        s.sendall(b"--bench-boundary--\r\n")
    s.sendall(b".\r\n")
    code, text = reply()
    t1 = time.monotonic()
    print(f"sent {sent} bytes in {t1 - t0:.2f}s: {text}")
    try:
        cmd("QUIT", 221)
    except SystemExit:
        pass
    s.close()
    sys.exit(0 if code == 250 else 1)


if __name__ == "__main__":
    main()
