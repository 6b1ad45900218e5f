# SPDX-License-Identifier: MIT
"""What scripts/check-links and the Doxygen Markdown filter both need to know about the
project's Markdown files (README.md and docs/*.md): which lines are code, the headings and the
anchors GitHub gives them, and the links and images of every other line.

Python 3 standard library only. Not a full CommonMark parser: it understands the subset the
project writes (ATX headings, fenced and indented code blocks, inline code, inline links and
images, reference definitions, <a href> and <img src>), and errs on the side of reporting.
"""

import os
import re
import unicodedata

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
LIST_ITEM = re.compile(r"^ {0,3}([-*+]|\d{1,9}[.)])[ \t]")
# [text](target "title") and ![alt](target); text may hold one level of brackets and code.
INLINE_LINK = re.compile(r"(!?)\[((?:[^\[\]`]|`[^`]*`|\[[^\[\]]*\])*)\]\(\s*<?([^\s()<>]*(?:\([^\s()]*\)[^\s()<>]*)*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[([^\]]+)\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_TARGET = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*\"([^\"]*)\"", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class Line:
    """One line of a Markdown file: its number (1-based), text, and whether it is code."""

    __slots__ = ("number", "text", "code", "fence_info", "fence_start", "fence_end")

    def __init__(self, number, text):
        self.number = number
        self.text = text
        self.code = False          # inside a code block (fences included)
        self.fence_info = None     # info string of the fence this line opens, e.g. "cpp"
        self.fence_start = False   # the opening fence line
        self.fence_end = False     # the closing fence line


def classify(text):
    """The file's lines, each marked as code or prose."""
    lines = [Line(i + 1, t) for i, t in enumerate(text.split("\n"))]
    fence = None          # the opening fence characters while inside a fenced block
    previous_blank = True
    previous_indented_code = False
    in_list = False
    for line in lines:
        t = line.text
        if fence is not None:
            line.code = True
            stripped = t.strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) <= {fence[0]}:
                line.fence_end = True
                fence = None
            previous_blank = False
            previous_indented_code = False
            continue
        match = FENCE.match(t)
        if match:
            fence = match.group(1)
            line.code = True
            line.fence_start = True
            line.fence_info = match.group(2).lower()
            previous_blank = False
            previous_indented_code = False
            continue
        blank = t.strip() == ""
        indented = t.startswith("    ") or t.startswith("\t")
        if not blank and LIST_ITEM.match(t):
            in_list = True
        elif not blank and not indented and not t.startswith("  ") and previous_blank:
            in_list = False
        if indented and not blank and not in_list and (previous_blank or previous_indented_code):
            line.code = True
            previous_indented_code = True
        elif not blank:
            previous_indented_code = False
        previous_blank = blank
    return lines


def strip_code_spans(text):
    """`text` with every inline code span replaced by spaces of the same length (so that column
    positions stay), for finding links outside code."""
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), text)


def heading_text(raw):
    """The text GitHub derives a heading's anchor from: links reduced to their text, images and
    HTML tags dropped, emphasis and code markers removed."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", raw)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\{#[^}]*\}\s*$", "", text)
    return text.replace("`", "").replace("*", "")


def github_slug(raw):
    """GitHub's anchor for a heading: lower case, every character that is not a letter, a digit,
    a space, a hyphen or an underscore removed, spaces turned into hyphens."""
    text = unicodedata.normalize("NFC", heading_text(raw)).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def headings(lines):
    """(line, level, raw text, anchor) of every heading outside code, with GitHub's -1, -2, …
    suffixes for repeated anchors."""
    seen = {}
    result = []
    for line in lines:
        if line.code:
            continue
        match = HEADING.match(line.text)
        if not match:
            continue
        raw = match.group(2)
        slug = github_slug(raw)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchor = slug if count == 0 else "%s-%d" % (slug, count)
        result.append((line, len(match.group(1)), raw, anchor))
    return result


def anchors(lines):
    """Every anchor a link may point at: the headings' and those of <a name/id="…"> tags."""
    result = {anchor for (_, _, _, anchor) in headings(lines)}
    for line in lines:
        if not line.code:
            result.update(re.findall(r"<a\s[^>]*(?:name|id)\s*=\s*\"([^\"]+)\"", line.text))
    return result


def links(lines):
    """(line, target, is_image) of every link and image outside code."""
    result = []
    for line in lines:
        if line.code:
            continue
        text = strip_code_spans(line.text)
        for match in INLINE_LINK.finditer(text):
            result.append((line, match.group(3), match.group(1) == "!"))
        match = REFERENCE_DEFINITION.match(text)
        if match:
            result.append((line, match.group(2), False))
        for target in HTML_TARGET.findall(text):
            result.append((line, target, "<img" in text.lower()))
    return result


def is_external(target):
    """Whether a link leaves the repository (http:, https:, mailto:, …)."""
    return bool(SCHEME.match(target)) or target.startswith("//")


def split_target(target):
    """(path, fragment) of a relative link; either may be empty."""
    path, _, fragment = target.partition("#")
    return path, fragment


def resolve(root, source, path):
    """The repository-relative path (with forward slashes) that `path`, written in the file
    `source` (repository-relative), points at, or None when it leaves the repository."""
    if path.startswith("/"):
        joined = path.lstrip("/")
    else:
        joined = os.path.join(os.path.dirname(source), path)
    normalized = os.path.normpath(joined).replace(os.sep, "/")
    if normalized == ".." or normalized.startswith("../") or os.path.isabs(normalized):
        return None
    return "" if normalized == "." else normalized


def site_pages(root):
    """The Markdown files the documentation site holds, repository-relative: README.md and
    docs/*.md, in a stable order."""
    pages = ["README.md"]
    docs = os.path.join(root, "docs")
    if os.path.isdir(docs):
        pages += sorted("docs/" + name for name in os.listdir(docs) if name.endswith(".md"))
    return [page for page in pages if os.path.isfile(os.path.join(root, page))]


def page_label(page):
    """The Doxygen label of a site page: the README is the main page ("index"), docs/x-y.md is
    guide_x_y."""
    if page == "README.md":
        return "index"
    stem = os.path.splitext(os.path.basename(page))[0]
    return "guide_" + re.sub(r"[^A-Za-z0-9_]", "_", stem)


def section_label(page, anchor):
    """The Doxygen label of the section of `page` that GitHub calls `anchor`."""
    prefix = "readme" if page == "README.md" else page_label(page)
    return prefix + "_" + re.sub(r"[^A-Za-z0-9_]", "_", anchor)
