"""Parsing submitted documents: every format from real bytes, every refusal, no disk writes.

The PDFs are written by hand (a catalog, a page, a Helvetica text object), so the test
knows exactly what text they hold; pypdf encrypts them, python-docx writes the .docx files.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import docx
import pypdf
import pytest
from sovereign_gateway.memory.documents import (
    DOCX,
    HTML,
    MARKDOWN,
    PDF,
    PLAIN,
    ParsedDocument,
    parse_document,
)
from sovereign_gateway.memory.errors import DocumentRejected


def pdf_bytes(*contents: bytes, image: bool = False) -> bytes:
    """A valid PDF with one page per content stream; `image` adds a 1x1 image XObject."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    objects.append(font)  # object 3
    resources = b"/Font << /F1 3 0 R >>"
    if image:
        objects.append(
            b"<< /Type /XObject /Subtype /Image /Width 1 /Height 1 /ColorSpace /DeviceGray "
            b"/BitsPerComponent 8 /Length 1 >>\nstream\n\x80\nendstream"
        )
        resources += b" /XObject << /Im1 4 0 R >>"
    kids: list[bytes] = []
    for content in contents:
        stream_number = len(objects) + 1
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
        kids.append(b"%d 0 R" % (stream_number + 1))
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << "
            + resources
            + b" >> /Contents %d 0 R >>" % stream_number
        )
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(kids))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def text_page(text: str) -> bytes:
    return b"BT /F1 12 Tf 72 712 Td (%s) Tj ET" % text.encode("latin-1")


def encrypted(pdf: bytes, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm="AES-256")
    sink = io.BytesIO()
    writer.write(sink)
    return sink.getvalue()


def docx_bytes() -> bytes:
    document = docx.Document()
    document.add_heading("Quarterly report", level=1)
    document.add_paragraph("Revenue grew in every region.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Region"
    table.cell(0, 1).text = "Growth"
    table.cell(1, 0).text = "North"
    table.cell(1, 1).text = "12%"
    document.add_paragraph("The board approved the budget.")
    sink = io.BytesIO()
    document.save(sink)
    return sink.getvalue()


def zip_bytes(**members: str) -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return sink.getvalue()


HTML_PAGE = b"""<!DOCTYPE html>
<html><head><title>Canary page</title>
<style>body { color: red }</style>
<script>var secret = "do not index";</script></head>
<body>
  <h1>Welcome</h1>
  <p>First   paragraph with <b>bold</b>
     text.</p>
  <noscript>enable javascript</noscript>
  <template><p>hidden template</p></template>
  <ul><li>one</li><li>two</li></ul>
  <div><span>inline</span></div>after<br>line two
  <!-- a comment -->
</body></html>
"""


def test_plain_text_keeps_paragraphs_and_collapses_blank_runs() -> None:
    raw = b"First line\r\nsecond line  \n\n\n\n\nNext paragraph\x00.\n\n"
    parsed = parse_document(raw, "text/plain; charset=utf-8")
    assert parsed == ParsedDocument("First line\nsecond line\n\nNext paragraph.", PLAIN, None)


def test_markdown_is_kept_as_written() -> None:
    raw = b"# Title\n\n- item *one*\n- item `two`\n"
    parsed = parse_document(raw, "text/x-markdown")
    assert parsed.media_type == MARKDOWN
    assert parsed.text == "# Title\n\n- item *one*\n- item `two`"
    assert parse_document(raw, filename="notes.markdown").media_type == MARKDOWN


def test_utf8_bom_is_stripped_and_unicode_kept() -> None:
    parsed = parse_document("Zürich 東京 ✓".encode("utf-8-sig"), filename="a.txt")
    assert parsed.text == "Zürich 東京 ✓"


def test_latin1_is_refused_naming_the_byte_offset() -> None:
    with pytest.raises(DocumentRejected, match=r"byte 0xe9 at offset 3\b") as caught:
        parse_document("café au lait".encode("latin-1"), "text/plain")
    assert caught.value.param == "content"
    assert caught.value.status == 422


def test_offset_counts_the_bom() -> None:
    with pytest.raises(DocumentRejected, match=r"offset 5\b"):
        parse_document(b"\xef\xbb\xbfab\xffc", "text/plain")


def test_html_drops_scripts_and_styles_and_breaks_lines_at_blocks() -> None:
    parsed = parse_document(HTML_PAGE, "text/html; charset=UTF-8")
    assert parsed.media_type == HTML
    assert parsed.text == (
        "Canary page\n\nWelcome\n\nFirst paragraph with bold text.\n\none\n\ntwo\n\n"
        "inline\nafter\nline two"
    )
    for hidden in ("secret", "color", "javascript", "hidden template", "comment"):
        assert hidden not in parsed.text


def test_html_pre_keeps_its_line_breaks() -> None:
    parsed = parse_document(b"<pre>line one\n    line two</pre><p>x</p>", "text/html")
    assert parsed.text == "line one\nline two\n\nx"


def test_pdf_text_from_every_page() -> None:
    raw = pdf_bytes(text_page("Hello canary"), text_page("Second page"))
    parsed = parse_document(raw, "application/pdf")
    assert parsed == ParsedDocument("Hello canary\n\nSecond page", PDF, 2)


def test_encrypted_pdf_is_refused() -> None:
    raw = encrypted(pdf_bytes(text_page("Hello canary")), user_password="user-secret")
    with pytest.raises(DocumentRejected, match="the PDF is encrypted") as caught:
        parse_document(raw, filename="locked.pdf")
    assert caught.value.param == "content"


def test_pdf_restricted_only_by_an_owner_password_opens() -> None:
    raw = encrypted(pdf_bytes(text_page("Hello canary")), user_password="")
    assert parse_document(raw).text == "Hello canary"


def test_pdf_without_a_text_layer_is_refused() -> None:
    raw = pdf_bytes(b"q 100 0 0 100 72 600 cm /Im1 Do Q", image=True)
    with pytest.raises(DocumentRejected, match=r"no extractable text.*OCR is not supported"):
        parse_document(raw, PDF)


def test_garbage_declared_as_pdf_is_refused_as_a_contradiction() -> None:
    with pytest.raises(DocumentRejected, match="says application/pdf but the content") as caught:
        parse_document(b"this is not a pdf", "application/pdf")
    assert caught.value.param == "media_type"
    with pytest.raises(DocumentRejected) as caught:
        parse_document(b"this is not a pdf", filename="report.pdf")
    assert caught.value.param == "filename"


def test_truncated_pdf_is_refused_with_the_parser_message() -> None:
    raw = pdf_bytes(text_page("Hello canary"))
    with pytest.raises(DocumentRejected, match=r"^the PDF cannot be read: \w+"):
        parse_document(raw[:40], PDF)


def test_docx_paragraphs_and_table_cells_in_order() -> None:
    parsed = parse_document(docx_bytes(), filename="report.docx")
    assert parsed.media_type == DOCX
    assert parsed.pages is None
    assert parsed.text == (
        "Quarterly report\n\nRevenue grew in every region.\n\nRegion | Growth\n\n"
        "North | 12%\n\nThe board approved the budget."
    )


def test_zip_that_is_not_docx_is_refused() -> None:
    archive = zip_bytes(**{"data.csv": "a,b\n1,2\n"})
    with pytest.raises(DocumentRejected, match="ZIP archive but not a Word") as caught:
        parse_document(archive)
    assert caught.value.param == "content"
    with pytest.raises(DocumentRejected, match=r"says application/vnd\.openxml"):
        parse_document(archive, DOCX)


def test_broken_docx_is_refused_with_the_parser_message() -> None:
    fake = zip_bytes(**{"word/document.xml": "<not-xml"})
    with pytest.raises(DocumentRejected, match=r"^the \.docx cannot be read: \w+"):
        parse_document(fake, DOCX)


def test_type_is_sniffed_without_a_declaration() -> None:
    assert parse_document(pdf_bytes(text_page("Hi there"))).media_type == PDF
    assert parse_document(docx_bytes()).media_type == DOCX
    assert parse_document(HTML_PAGE).media_type == HTML
    assert parse_document(b"just words").media_type == PLAIN
    # An unknown extension and an undeclared type fall through to sniffing.
    assert parse_document(HTML_PAGE, "application/octet-stream", "page.bin").media_type == HTML
    assert parse_document(b"# hi", "", "notes.md").media_type == MARKDOWN


def test_declaration_beats_extension_beats_sniffing() -> None:
    assert parse_document(b"# hi", "text/plain", "notes.md").media_type == PLAIN
    assert parse_document(b"# hi", filename="notes.md").media_type == MARKDOWN
    # HTML source declared as text is indexed as its source.
    assert parse_document(HTML_PAGE, "text/plain").text.startswith("<!DOCTYPE html>")


def test_binary_declared_as_text_is_refused() -> None:
    with pytest.raises(DocumentRejected, match="says text/plain but the content is a PDF"):
        parse_document(pdf_bytes(text_page("Hi there")), "text/plain")


def test_unsupported_type_or_charset_names_media_type() -> None:
    with pytest.raises(DocumentRejected, match="unsupported media type 'image/png'") as caught:
        parse_document(b"\x89PNG", "image/png")
    assert caught.value.param == "media_type"
    with pytest.raises(DocumentRejected, match="unsupported charset 'iso-8859-1'") as caught:
        parse_document(b"abc", "text/plain; charset=ISO-8859-1")
    assert caught.value.param == "media_type"


def test_unknown_binary_is_refused_as_unsupported() -> None:
    with pytest.raises(DocumentRejected, match=r"not a supported document.*offset 0"):
        parse_document(b"\x89PNG\r\n\x1a\n\x00\x00", filename="photo.png")


@pytest.mark.parametrize(
    "raw", [b"", b"  \n\t\n ", b"<html><script>x()</script></html>", b"\x00\x00"]
)
def test_empty_documents_are_refused(raw: bytes) -> None:
    with pytest.raises(DocumentRejected, match=r"empty|no text") as caught:
        parse_document(raw)
    assert caught.value.param == "content"


WRITE_MODES = frozenset("wax+")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = frozenset(
    {"tempfile.mkstemp", "tempfile.mkdtemp", "os.mkdir", "os.rename", "os.remove", "os.truncate"}
)
_watch: list[list[tuple[str, tuple[Any, ...]]]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _watch:
        return
    if event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        writes = (
            bool(WRITE_MODES & set(mode))
            if isinstance(mode, str)
            else isinstance(flags, int) and bool(flags & WRITE_FLAGS)
        )
        if writes:
            _watch[-1].append((event, args))
    elif event in WRITE_EVENTS or event.startswith("shutil."):
        _watch[-1].append((event, args))


sys.addaudithook(_audit)  # hooks cannot be removed; `_watch` switches this one on and off


@contextmanager
def disk_writes() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Collect every file-writing event (open for writing, temp files) in this block."""
    seen: list[tuple[str, tuple[Any, ...]]] = []
    _watch.append(seen)
    try:
        yield seen
    finally:
        _watch.pop()


def test_the_write_guard_sees_writes(tmp_path: Any) -> None:
    with disk_writes() as seen:
        (tmp_path / "x").write_text("x")
        os.close(os.open(tmp_path / "y", os.O_CREAT | os.O_WRONLY))
    assert [event for event, _ in seen] == ["open", "open"]


def test_parsing_every_format_writes_nothing_to_disk() -> None:
    samples = [
        (pdf_bytes(text_page("Hello canary")), PDF),
        (encrypted(pdf_bytes(text_page("Hello canary")), user_password=""), PDF),
        (docx_bytes(), DOCX),
        (HTML_PAGE, HTML),
        (b"# md", MARKDOWN),
        ("plain ✓".encode(), PLAIN),
    ]
    with disk_writes() as seen:
        results = [parse_document(raw, kind).media_type for raw, kind in samples]
        for raw, kind in [
            (encrypted(pdf_bytes(text_page("x")), user_password="pw"), PDF),
            (pdf_bytes(b"", image=True), PDF),
            (zip_bytes(**{"word/document.xml": "<w/>"}), DOCX),
        ]:
            with pytest.raises(DocumentRejected):
                parse_document(raw, kind)
    assert results == [kind for _, kind in samples]
    assert seen == []
