"""Reading a .surg script from disk, with located errors for what is not a readable UTF-8 file."""

from __future__ import annotations

from pathlib import Path

from surgery.diagnostics import Code, Diagnostic, SurgeryError, error
from surgery.source import SourceFile


def read_script(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise error(Code.E0602, f"script `{path}` does not exist")
    if p.is_dir():
        raise error(Code.E0602, f"`{path}` is a directory, not a .surg script",
                    help=f"name a script, e.g. `{Path(path) / 'recipe.surg'}`; to check several, "
                         "run the command once per file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise error(Code.E0602, f"cannot read script `{path}`: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Locate the first bad byte: the text before it decodes, so its length is the offset.
        offset = len(data[:e.start].decode("utf-8"))
        src = SourceFile(data.decode("utf-8", errors="replace"), str(path))
        raise SurgeryError(Diagnostic(
            Code.E0106, f"script is not UTF-8 text: byte 0x{data[e.start]:02x} cannot be decoded",
            src.span_at(offset, offset + 1), source=src,
            help="save the script as UTF-8")) from None
