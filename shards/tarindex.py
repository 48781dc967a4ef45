"""A tar shard in memory: one pass over its headers, for readers that take views, not copies.

`members` walks the 512-byte headers of a ustar/pax archive (what Python's tarfile and webdataset write) in any
buffer (bytes, a uint8 array) and returns each regular member's name, data offset and size; `samples` groups them
by webdataset's rule (key = the name up to the first dot of its last path component).
"""
from __future__ import annotations

BLOCK = 512


class TarError(ValueError):
    """The buffer is not a well-formed tar archive (the message says where)."""


def _number(field: bytes, where: int) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"a header at byte {where} holds no octal number ({bytes(field)!r})") from None


def _pax_records(data: bytes, where: int) -> dict[str, str]:
    """A pax extended header's "LENGTH KEY=VALUE\\n" records."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        if space < 0:
            raise TarError(f"a pax header at byte {where} is malformed")
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode()
        pos += length
    return out


def members(buf) -> list[tuple[str, int, int]]:
    """[(name, data offset, size)] of the regular members, in archive order."""
    out, pos, end, pending, view = [], 0, len(buf), {}, memoryview(buf).cast("B")
    while pos + BLOCK <= end:
        header = view[pos:pos + BLOCK].tobytes()
        if header[0] == 0 and header.count(0) == BLOCK:  # end of archive: a zero block (a member's name is not empty)
            return out
        size = _number(header[124:136], pos)
        kind = header[156:157]
        data = pos + BLOCK
        if data + size > end:
            raise TarError(f"the member at byte {pos} runs past the end of the file ({end} bytes)")
        if kind in (b"x", b"g"):                        # pax: per-member (x) or global (g) records
            records = _pax_records(bytes(buf[data:data + size]), pos)
            if kind == b"x":
                pending = records
        elif kind in (b"0", b"\0"):
            name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0").decode() if header[345] and header[257:262] == b"ustar" else ""
            name = pending.get("path", f"{prefix}/{name}" if prefix else name)
            out.append((name, data, int(pending.get("size", size))))
            pending = {}
        else:
            pending = {}                                 # directories, links: not sample entries
        pos = data + -(-size // BLOCK) * BLOCK
    raise TarError(f"the archive ends at byte {end} without its end-of-archive block")


def samples(buf) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {extension: (data offset, size)})] in archive order, grouped as webdataset groups them."""
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for name, offset, size in members(buf):
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        key = f"{folder}/{stem}" if folder else stem
        if not out or out[-1][0] != key:
            out.append((key, {}))
        out[-1][1][ext] = (offset, size)
    return out
