"""The user documentation: a short README whose marked commands run as written, that lists every
output column, whose links lead somewhere; and no lab notebook in the product."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 300
# Pages that other work adds; a link to them may lead nowhere until it lands.
WRITTEN_ELSEWHERE = {"docs/decisions/001-full-network.md", "docs/dicom-gate.md", "docs/failures.md"}
RUNNABLE = "<!-- runnable -->"
BLOCK_TIMEOUT_S = 180


def fenced_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, runnable) of every fenced block. Runnable: the fence's info string says
    ``runnable`` (```bash runnable) or the line before the fence is ``<!-- runnable -->``."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = re.match(r"^```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        start, info = i, m.group(1).split()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marked = "runnable" in info or (start > 0 and lines[start - 1].strip() == RUNNABLE)
        blocks.append((start + 1, "\n".join(lines[start + 1:end]), marked))
        i = end + 1
    return blocks


def runnable_blocks() -> list[tuple[int, str]]:
    return [(line, code) for line, code, marked in fenced_blocks(README.read_text()) if marked]


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it to {MAX_README_LINES} and move the rest to docs/"


def test_the_readme_marks_cheap_commands_as_runnable():
    blocks = runnable_blocks()
    assert len(blocks) >= 2, "mark the README's cheap commands with <!-- runnable --> so that they are tested"
    assert any("cxr-batch score" in code for _, code in blocks), "the README's first score command is not tested"


@pytest.mark.parametrize("line,code", runnable_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_a_runnable_readme_block_runs_as_written(line, code, tmp_path):
    """Each marked block runs in a fresh folder, as a reader would paste it into a shell."""
    env = {**os.environ, "CXR_BATCH_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)  # the README's commands run on this machine
    env.pop("CXR_BATCH_MODEL", None)
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=BLOCK_TIMEOUT_S)
    output = p.stdout + p.stderr
    assert p.returncode == 0, f"README.md line {line}: exit {p.returncode}\n{code}\n{output[-3000:]}"
    assert "Traceback" not in output, f"README.md line {line}:\n{output[-3000:]}"


def test_fenced_blocks_are_found_and_marked():
    """The parser the runnable test relies on: a marker on the line before, or in the info string."""
    text = "x\n<!-- runnable -->\n```bash\necho a\n```\n```bash runnable\necho b\n```\n```bash\necho c\n```\n"
    assert [(code, marked) for _, code, marked in fenced_blocks(text)] == [
        ("echo a", True), ("echo b", True), ("echo c", False)]


# What belongs in git history and decision records, not in the README or the package.
HISTORY = [
    (re.compile(r"\brounds? \d+", re.I), "a round of the project's history"),
    (re.compile(r"\bissues? \d+", re.I), "an issue number"),
    (re.compile(r"(?<![\w&/])#\d+\b"), "an issue reference"),
    (re.compile(r"cam-findings", re.I), "the findings log"),
]


def history_hits(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    hits = []
    for pattern, what in HISTORY:
        if what == "an issue reference" and path.suffix == ".css":
            continue  # colours such as #333 are not issue references
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{path.relative_to(REPO)}:{line}: {what} ({m.group(0)!r})")
    return hits


def test_history_hits_are_found():
    """The patterns catch what they must and leave ordinary words and colours alone."""
    cases = {"since round 6": 1, "cam-findings round 13": 2, "issue 12's target": 1, "see #31": 1,
             "around 0.5, round(x, 2), colour #0072B2, rounded": 0}
    for text, n in cases.items():
        found = sum(len(p.findall(text)) for p, _ in HISTORY)
        assert found == n, (text, found)


def test_no_history_in_the_readme_or_the_package():
    files = [README, *sorted(p for p in (REPO / "cxr_batch").rglob("*") if p.is_file() and "__pycache__" not in p.parts)]
    hits = [h for f in files for h in history_hits(f)]
    assert not hits, "say why without citing the project's history:\n" + "\n".join(hits)


def test_the_readme_lists_every_output_column():
    from cxr_batch.archive.results import SCHEMA

    text = README.read_text()
    section = text.split("### The output table", 1)[1].split("\n#", 1)[0]
    listed = {name for row in re.findall(r"^\| (.+?) \|", section, re.M) for name in re.findall(r"`([a-z_0-9]+)`", row)}
    assert set(SCHEMA.names) - listed == set(), f"columns missing from the README's table: {set(SCHEMA.names) - listed}"
    assert listed - set(SCHEMA.names) == set(), f"the README lists columns the table lacks: {listed - set(SCHEMA.names)}"


def test_no_lab_notebook_in_docs():
    assert not (DOCS / "experiments").exists(), "docs/experiments is a lab notebook: git keeps it"
    lab = [p.name for p in DOCS.rglob("*") if re.search(r"open[-_]?work|findings", p.name, re.I)]
    assert not lab, f"lab pages in docs/: {lab}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # commands, not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        rel = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
        if rel in WRITTEN_ELSEWHERE:
            continue
        if not dest.exists():
            broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    return broken


def test_every_link_in_the_readme_and_docs_leads_somewhere():
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    broken = [b for page in pages for b in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_docs_page():
    text = README.read_text()
    missing = [p.relative_to(REPO).as_posix() for p in sorted(DOCS.glob("*.md"))
               if f"({p.relative_to(REPO).as_posix()}" not in text]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_docs_pages_named_in_the_code_exist():
    """cluster.yaml, the job scripts and the package point readers at docs pages: those pages exist."""
    sources = [REPO / "cluster.yaml", *(REPO / "jobs").glob("*.py"), *(REPO / "scripts").glob("*"),
               *(REPO / "cxr_batch").rglob("*.py")]
    missing = []
    for src in sources:
        for ref in set(re.findall(r"docs/[\w./-]+\.md", src.read_text())):
            if ref not in WRITTEN_ELSEWHERE and not (REPO / ref).exists():
                missing.append(f"{src.relative_to(REPO)}: {ref}")
    assert not missing, "\n".join(sorted(missing))
