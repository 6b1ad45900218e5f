#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Doxygen input filter for the project's Markdown pages (FILTER_PATTERNS in docs/Doxyfile.in).

The pages are written for GitHub, where they are read most; this gives Doxygen the same pages
in the form it understands, without changing the number of lines (so warnings point at the
right line of the file):

  - the title heading gets the page's label ({#guide_<name>}; the README is the main page) and
    every other heading the label of its GitHub anchor ({#<page>_<anchor>});
  - links between pages and to sections (page.md, page.md#anchor, #anchor) become @ref links;
    links to public headers become @ref links to their file pages; images keep their file name
    (Doxygen finds them in IMAGE_PATH, docs/); links to other repository files, which the site
    does not hold, keep their text and lose the link;
  - GitHub math, ```math blocks and $`…`$ inline, becomes Doxygen's \\f[ … \\f] and \\f$ … \\f$
    (rendered by MathJax).

    doxygen_markdown_filter.py FILE.md   (writes the filtered page to standard output)
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparsemoe_markdown as md  # noqa: E402

INLINE_MATH = re.compile(r"\$`([^`]+)`\$")
IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")


def rewrite_target(root, page, target, is_image):
    """The Doxygen form of a link target, or None to drop the link and keep its text."""
    if not target or md.is_external(target):
        return target
    path, fragment = md.split_target(target)
    resolved = md.resolve(root, page, path) if path else page
    if resolved is None:
        return None
    if is_image or resolved.lower().endswith(IMAGE_SUFFIXES):
        return os.path.basename(resolved)
    if resolved in md.site_pages(root):
        if fragment:
            return "@ref " + md.section_label(resolved, fragment)
        return "@ref " + md.page_label(resolved)
    if resolved.startswith("include/") and resolved.endswith(".hpp"):
        return "@ref " + resolved[len("include/"):]
    return None


def filter_line(root, page, text):
    """One prose line with its links rewritten and its inline math converted."""
    spans = []

    def hide(match):  # code spans are left alone
        spans.append(match.group(0))
        return "\0%d\0" % (len(spans) - 1)

    text = INLINE_MATH.sub(lambda m: "\\f$" + m.group(1) + "\\f$", text)
    text = md.CODE_SPAN.sub(hide, text)

    def link(match):
        bang, label, target = match.group(1), match.group(2), match.group(3)
        new = rewrite_target(root, page, target, bang == "!")
        if new is None:
            return label
        return "%s[%s](%s)" % (bang, label, new)

    text = md.INLINE_LINK.sub(link, text)
    return re.sub(r"\0(\d+)\0", lambda m: spans[int(m.group(1))], text)


def main(path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    page = os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    lines = md.classify(text)
    labels = {}
    first_heading = True
    for line, level, raw, anchor in md.headings(lines):
        if first_heading and level == 1:
            labels[line.number] = None if page == "README.md" else md.page_label(page)
        else:
            labels[line.number] = md.section_label(page, anchor)
        first_heading = False
    out = []
    in_math = False
    for line in lines:
        text = line.text
        if line.code:
            if line.fence_start and line.fence_info == "math":
                in_math = True
                text = "\\f["
            elif in_math and line.fence_end:
                in_math = False
                text = "\\f]"
            out.append(text)
            continue
        text = filter_line(root, page, text)
        label = labels.get(line.number, False)
        if label:
            text = text.rstrip() + " {#" + label + "}"
        out.append(text)
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
