"""Turn a submitted document into plain text, in RAM only.

Takes the submitted bytes with an optional declared media type and filename; gives a
`ParsedDocument` (the text, the media type it was read as, the page count of a PDF) or
raises `DocumentRejected` naming the field at fault. The type is the declared one if
given, else the filename's extension's, else what the bytes look like; a declared type
the bytes contradict is refused, not guessed around. The parsers only ever see
`io.BytesIO`: nothing here writes a file, so the plaintext never reaches a disk.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath

import docx
import pypdf
from bs4 import BeautifulSoup
from bs4.element import (
    CData,
    Comment,
    Declaration,
    Doctype,
    NavigableString,
    ProcessingInstruction,
)
from docx.table import Table
from docx.text.paragraph import Paragraph

from sovereign_gateway.memory.errors import DocumentRejected

PLAIN = "text/plain"
MARKDOWN = "text/markdown"
HTML = "text/html"
PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
SUPPORTED = frozenset({PLAIN, MARKDOWN, HTML, PDF, DOCX})

ALIASES = {"text/x-markdown": MARKDOWN, "application/x-pdf": PDF}
EXTENSIONS = {
    ".txt": PLAIN,
    ".text": PLAIN,
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".html": HTML,
    ".htm": HTML,
    ".pdf": PDF,
    ".docx": DOCX,
}
# Multipart clients send this when they do not know; it declares nothing.
UNDECLARED = frozenset({"", "application/octet-stream"})
TEXT_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})

BOM = b"\xef\xbb\xbf"
# A .docx of a few MB that inflates past this is a zip bomb, not a document.
MAX_UNPACKED_BYTES = 256 * 1024 * 1024
HTML_SNIFF_BYTES = 1024

DROPPED_HTML = ("script", "style", "noscript", "template")
_SKIPPED_HTML = (Comment, Declaration, Doctype, CData, ProcessingInstruction)
BLOCK_HTML = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "caption", "dd", "div", "dl",
        "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4",
        "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table",
        "tbody", "td", "tfoot", "th", "thead", "title", "tr", "ul",
    }
)  # fmt: skip
HTML_START = re.compile(rb"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>])", re.I | re.S)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class ParsedDocument:
    text: str
    media_type: str
    pages: int | None  # PDF only


def parse_document(
    content: bytes, media_type: str | None = None, filename: str | None = None
) -> ParsedDocument:
    if not content:
        raise DocumentRejected("the document is empty", "content")
    kind, source = _resolve_type(content, media_type, filename)
    pages = None
    if kind == PDF:
        text, pages = _pdf_text(content)
    elif kind == DOCX:
        text = _docx_text(content)
    elif kind == HTML:
        text = _html_text(_utf8(content, source))
    else:
        text = _utf8(content, source)
    text = normalise(text)
    if not text:
        raise DocumentRejected("the document has no text", "content")
    return ParsedDocument(text=text, media_type=kind, pages=pages)


def normalise(text: str) -> str:
    """Unify line ends, drop control characters, trailing blanks and runs of blank lines.

    Paragraph breaks (one blank line) survive: the chunker prefers to cut there.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    return _BLANK_LINES.sub("\n\n", text).strip()


def _resolve_type(content: bytes, media_type: str | None, filename: str | None) -> tuple[str, str]:
    """The type to parse as and the field it came from ("content" when sniffed)."""
    sniffed = _sniff(content)
    declared, source = None, "content"
    if media_type is not None and media_type.split(";")[0].strip().lower() not in UNDECLARED:
        declared, source = _declared_type(media_type), "media_type"
    elif filename is not None:
        declared = EXTENSIONS.get(PurePath(filename).suffix.lower())
        source = "filename" if declared is not None else "content"
    if declared is None:
        if sniffed == "zip":
            raise DocumentRejected(
                "the content is a ZIP archive but not a Word .docx document", "content"
            )
        return sniffed, source
    if (declared in (PDF, DOCX) or sniffed in (PDF, DOCX, "zip")) and sniffed != declared:
        found = {PDF: "a PDF", DOCX: "a .docx", "zip": "a ZIP archive"}.get(sniffed, "text")
        raise DocumentRejected(f"the {source} says {declared} but the content is {found}", source)
    return declared, source


def _declared_type(media_type: str) -> str:
    essence, *parameters = (part.strip() for part in media_type.split(";"))
    essence = ALIASES.get(essence.lower(), essence.lower())
    if essence not in SUPPORTED:
        raise DocumentRejected(
            f"unsupported media type {essence!r}; supported: {', '.join(sorted(SUPPORTED))}",
            "media_type",
        )
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in TEXT_CHARSETS:
            raise DocumentRejected(
                f"unsupported charset {charset!r}: text must be UTF-8", "media_type"
            )
    return essence


def _sniff(content: bytes) -> str:
    if content.lstrip().startswith(b"%PDF-"):
        return PDF
    if content.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(content)) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return "zip"
        return DOCX if "word/document.xml" in names else "zip"
    if HTML_START.match(content.removeprefix(BOM)[:HTML_SNIFF_BYTES]):
        return HTML
    return PLAIN


def _utf8(content: bytes, source: str) -> str:
    skipped = len(BOM) if content.startswith(BOM) else 0
    try:
        return content[skipped:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skipped
        if source == "content":
            raise DocumentRejected(
                "the content is not a supported document (PDF, DOCX, HTML, Markdown or "
                f"UTF-8 text): byte offset {offset} is not valid UTF-8",
                "content",
            ) from None
        raise DocumentRejected(
            f"the content is not valid UTF-8: byte {content[offset]:#04x} at offset {offset}",
            "content",
        ) from None


def _pdf_text(content: bytes) -> tuple[str, int]:
    try:
        reader = pypdf.PdfReader(io.BytesIO(content))
        # Restricting only editing or printing leaves the user password empty: every
        # viewer opens such a file, and so do we. A real password we do not have.
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentRejected(
                "the PDF is encrypted with a password; submit a decrypted copy", "content"
            )
        texts = [page.extract_text() or "" for page in reader.pages]
    except DocumentRejected:
        raise
    except Exception as exc:  # pypdf raises many types, none of which may leak a traceback
        raise DocumentRejected(f"the PDF cannot be read: {_reason(exc)}", "content") from None
    if not any(text.strip() for text in texts):
        raise DocumentRejected(
            f"the PDF has no extractable text in its {len(texts)} page(s) (scanned images?); "
            "OCR is not supported",
            "content",
        )
    return "\n\n".join(texts), len(texts)


def _docx_text(content: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
        if unpacked > MAX_UNPACKED_BYTES:
            raise DocumentRejected(
                f"the .docx unpacks to {unpacked} bytes, over the limit of {MAX_UNPACKED_BYTES}",
                "content",
            )
        document = docx.Document(io.BytesIO(content))
        blocks: list[str] = []
        _docx_blocks(document.iter_inner_content(), blocks)
    except DocumentRejected:
        raise
    except Exception as exc:  # python-docx and lxml raise many types
        raise DocumentRejected(f"the .docx cannot be read: {_reason(exc)}", "content") from None
    return "\n\n".join(blocks)


def _docx_blocks(items: Iterable[Paragraph | Table], blocks: list[str]) -> None:
    """Paragraphs and tables in document order; a table row's cells on one line."""
    for item in items:
        if isinstance(item, Paragraph):
            blocks.append(item.text)
        elif isinstance(item, Table):
            for row in item.rows:
                cells: list[str] = []
                seen: set[int] = set()
                for cell in row.cells:
                    # A merged cell is returned once per grid column it spans.
                    if id(cell._tc) in seen:
                        continue
                    seen.add(id(cell._tc))
                    inner: list[str] = []
                    _docx_blocks(cell.iter_inner_content(), inner)
                    cells.append(" ".join(part for part in inner if part.strip()))
                blocks.append(" | ".join(cells))


class _Edge(NavigableString):
    """A line break standing in for the start or end of a block element."""


def _html_text(markup: str) -> str:
    try:
        soup = BeautifulSoup(markup, "html.parser")
    except Exception as exc:
        raise DocumentRejected(f"the HTML cannot be read: {_reason(exc)}", "content") from None
    for tag in soup.find_all(DROPPED_HTML):
        tag.decompose()
    for tag in soup.find_all(BLOCK_HTML):
        tag.insert_before(_Edge("\n"))
        tag.insert_after(_Edge("\n"))
    for tag in soup.find_all("br"):
        tag.replace_with(_Edge("\n"))
    # Source whitespace means nothing in HTML outside <pre>; block elements make the lines.
    parts: list[str] = []
    for node in soup.descendants:
        if not isinstance(node, NavigableString) or isinstance(node, _SKIPPED_HTML):
            continue
        if isinstance(node, _Edge) or node.find_parent("pre") is not None:
            parts.append(str(node))
        else:
            parts.append(_SPACES.sub(" ", str(node)))
    # Indentation goes too, inside <pre> as well: it does not change what text means.
    return "\n".join(line.strip() for line in "".join(parts).split("\n"))


def _reason(exc: Exception) -> str:
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
