"""Whether a corpus file is text, so that a binary renamed .txt is not trained on silently.

A file is not text when it holds a NUL byte, or when more than BAD_SHARE of its bytes, and
more than BAD_BYTES_FREE, are not valid UTF-8. Stray bytes of another encoding (a Latin-1
"é" in a UTF-8 file) pass and become U+FFFD as before; a UTF-8 BOM is valid UTF-8.
json/jsonl files are checked strictly (no NUL, no undecodable byte at all): `datasets`
refuses those bytes anyway, and the check names the file and lets data.skip_bad_files skip
it. Each file is read once, in chunks, and only when the token cache is built.
"""

from __future__ import annotations

import codecs

BAD_SHARE = 0.01  # of a file's bytes that may be undecodable
BAD_BYTES_FREE = 16  # undecodable bytes any file may have, however small
CHUNK = 1 << 20


def not_text(path: str, strict: bool = False) -> str | None:
    """Why the file at `path` is not text (for an error message), or None when it is.

    strict: not a single undecodable byte is allowed (json and jsonl files).
    """
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    read = valid = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            nul = chunk.find(b"\0")
            if nul != -1:
                return f"a NUL byte at offset {read + nul:,}"
            read += len(chunk)
            # surrogateescape turns each undecodable byte into a lone surrogate, which
            # "ignore" then drops on the way back: what is left is the valid bytes.
            valid += len(decoder.decode(chunk).encode("utf-8", "ignore"))
    valid += len(decoder.decode(b"", final=True).encode("utf-8", "ignore"))
    bad = read - valid
    allowed = 0 if strict else max(BAD_BYTES_FREE, BAD_SHARE * read)
    if bad <= allowed:
        return None
    return f"{bad:,} of its {read:,} bytes ({100 * bad / read:.3g}%) are not UTF-8"
