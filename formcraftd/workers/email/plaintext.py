"""A readable plain-text version of an HTML mail, for templates without a `.txt`.

Not a faithful rendering: blocks become lines, table rows `label: value`,
list items `- item`, links keep their URL in brackets, and what mail clients
do not show (``<head>``, ``<style>``, a ``display:none`` preheader) is dropped.
"""

from __future__ import annotations

from html.parser import HTMLParser

__all__ = ["html_to_text"]

_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "div", "dl", "dt", "dd", "fieldset",
        "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
        "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody", "thead",
        "tfoot", "tr", "ul",
    }
)  # fmt: skip
_PARAGRAPHS = frozenset({"p", "h1", "h2", "h3", "h4", "table", "ul", "ol", "blockquote", "pre"})
_SKIPPED = frozenset({"head", "script", "style", "template", "title"})
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "wbr"}
)


class _TextExtractor(HTMLParser):
    """Collects text: blocks become lines, cells are separated, links keep their URL.

    Elements that mail clients do not show (``<head>``, ``<style>``, a
    ``display:none`` preheader) are skipped.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._line: list[str] = []
        self._hidden: list[str] = []  # the open tags that hide their content
        self._cells = 0
        self._links: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        style = (attributes.get("style") or "").replace(" ", "").lower()
        if self._hidden or tag in _SKIPPED or "display:none" in style:
            if tag not in _VOID:
                self._hidden.append(tag)
        elif tag == "br":
            self._break()
        elif tag in ("td", "th"):
            if self._cells:
                self._line = ["".join(self._line).rstrip(), ": " if self._cells == 1 else " | "]
            self._cells += 1
        elif tag == "a":
            self._links.append(attributes.get("href"))
        elif tag in _BLOCKS:
            self._break()
            if tag == "li":
                self._line.append("- ")
            elif tag == "tr":
                self._cells = 0

    def handle_endtag(self, tag: str) -> None:
        if self._hidden:
            if tag in self._hidden:
                while self._hidden.pop() != tag:
                    pass
        elif tag == "a" and self._links:
            href = self._links.pop() or ""
            target = href.removeprefix("mailto:")
            if href.startswith(("http:", "https:", "mailto:")) and target not in "".join(
                self._line
            ):
                self._line.append(f" ({target})")
        elif tag in _BLOCKS:
            self._break()
            if tag in _PARAGRAPHS:
                self.lines.append("")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self._line.append(data)

    def _break(self) -> None:
        line = " ".join("".join(self._line).split())
        self._line = []
        if line:
            self.lines.append(line)

    def text(self) -> str:
        self.close()
        self._break()
        lines: list[str] = []
        for line in self.lines:
            if line or (lines and lines[-1]):
                lines.append(line)
        while lines and not lines[-1]:
            lines.pop()
        return "\n".join(lines) + "\n"


def html_to_text(html: str) -> str:
    """A plain-text version of an HTML mail: readable lines, not a faithful rendering."""
    extractor = _TextExtractor()
    extractor.feed(html)
    return extractor.text()
