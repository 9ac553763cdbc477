"""The port-forward SPDY/3.1 server (node/pods/portforward.py) driven as kubectl drives it, over an in-memory pipe."""

from __future__ import annotations

import asyncio
import struct
import zlib

from virtplane.node.pods import portforward as pf


class Client:
    """kubectl's side: its own header compressor, and a reader for what the server sends."""

    def __init__(self) -> None:
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, pf.DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=pf.DICTIONARY)
        self.reader = pf.FrameReader()
        self.frames: list[tuple[bool, int, int, bytes]] = []

    def syn_stream(self, stream_id: int, headers: dict[str, str], fin: bool = False) -> bytes:
        block = self.deflate.compress(pf.encode_headers(headers)) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        payload = struct.pack(">IIH", stream_id, 0, 0) + block
        return pf.control_frame(pf.SYN_STREAM, pf.FLAG_FIN if fin else 0, payload)

    async def receive(self, data: bytes) -> None:
        self.frames.extend(self.reader.feed(data))

    def data_for(self, stream_id: int) -> tuple[bytes, bool]:
        out, fin = b"", False
        for control, ident, flags, payload in self.frames:
            if not control and ident == stream_id:
                out += payload
                fin = fin or bool(flags & pf.FLAG_FIN)
        return out, fin


def test_dictionary_is_spdy3s() -> None:
    assert len(pf.DICTIONARY) == 1423
    assert pf.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert pf.DICTIONARY.endswith(b",*,enq=0.")


def test_frames_cut_anywhere_are_reassembled() -> None:
    frames = pf.data_frame(3, 0, b"abc") + pf.control_frame(pf.PING, 0, struct.pack(">I", 1))
    reader = pf.FrameReader()
    got = []
    for i in range(len(frames)):
        got += reader.feed(frames[i:i + 1])
    assert got == [(False, 3, 0, b"abc"), (True, pf.PING, 0, struct.pack(">I", 1))]


async def test_a_connection_is_forwarded_and_ended_like_the_kubelet_does() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's FIN
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Client()

    async def dial(remote: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if remote != 8080:
            raise OSError(f"failed to connect to localhost:{remote}: connection refused")
        return await asyncio.open_connection("127.0.0.1", port)

    session = pf.Session(client.receive, dial)
    await session.feed(client.syn_stream(1, {"streamType": "error", "port": "8080", "requestID": "0"}))
    await session.feed(pf.data_frame(1, pf.FLAG_FIN, b""))  # kubectl closes its side of the error stream
    await session.feed(client.syn_stream(3, {"streamType": "data", "port": "8080", "requestID": "0"}))
    await session.feed(pf.data_frame(3, 0, b"hel") + pf.data_frame(3, pf.FLAG_FIN, b"lo"))
    for _ in range(200):
        if client.data_for(1)[1]:
            break
        await asyncio.sleep(0.01)
    replies = [(c, k, p) for c, k, _f, p in client.frames if c and k == pf.SYN_REPLY]
    assert [struct.unpack_from(">I", p)[0] for _c, _k, p in replies] == [1, 3]
    assert client.inflate.decompress(replies[0][2][4:]) == b"\x00\x00\x00\x00"  # empty header block
    assert client.data_for(3) == (b"echo:hello", True)
    assert client.data_for(1) == (b"", True)  # no error
    # a port nothing listens on: the message on the error stream, both streams ended
    await session.feed(client.syn_stream(5, {"streamType": "error", "port": "9", "requestID": "1"}))
    await session.feed(client.syn_stream(7, {"streamType": "data", "port": "9", "requestID": "1"}))
    for _ in range(200):
        if client.data_for(7)[1]:
            break
        await asyncio.sleep(0.01)
    message, fin = client.data_for(5)
    assert fin and b"error forwarding port 9 to pod" in message
    # pings are echoed
    await session.feed(pf.control_frame(pf.PING, 0, struct.pack(">I", 7)))
    assert client.frames[-1] == (True, pf.PING, 0, struct.pack(">I", 7))
    await session.close()
    server.close()
    await server.wait_closed()
