"""The docs hold together: every relative link of README.md, BENCHMARKS.md and docs/*.md names a file
that exists (and a heading of it, for a #fragment), and the README stays short enough to read."""
import glob
import os
import re

from helpers import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")

def pages():
    return [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "BENCHMARKS.md"),
            *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]

def anchors(path):
    """GitHub's anchors of a markdown file's headings: lowercase, punctuation dropped, spaces as '-'."""
    out = set()
    for line in open(path, encoding="utf-8"):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out

def broken(path):
    """the relative links of a page that do not resolve."""
    bad = []
    for target in LINK.findall(open(path, encoding="utf-8").read()):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, frag = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            bad.append(target)
        elif frag and dest.endswith(".md") and frag not in anchors(dest):
            bad.append(target)
    return bad

def test_the_link_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Title here\n[ok](a.md#title-here) [no](b.md) [no anchor](a.md#nope) [web](https://x.org)\n"
    )
    assert broken(str(tmp_path / "a.md")) == ["b.md", "a.md#nope"]

def test_every_link_resolves():
    bad = {os.path.relpath(p, ROOT): broken(p) for p in pages()}
    assert not any(bad.values()), {k: v for k, v in bad.items() if v}

def test_readme_is_short():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) < 20_000
