"""Reading a stream socket exactly: the one reader the ttrpc framing (hcl/ttrpc.py) and swtpm's
sockets (devices/swtpm.py) share."""


def read_exact(sock, n: int) -> bytes | None:
    """n bytes, or None at a clean end of stream before the first byte; EOFError mid-way."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise EOFError(f"the peer hung up {got} bytes into a {n}-byte read")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
