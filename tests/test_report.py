"""The static report: one Markdown source rendered to HTML; figures, verdicts from the data,
paper tables, provenance, missing pieces, and bugs told apart from missing data."""

from __future__ import annotations

import argparse
import html as htmllib
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tokenlake import analyze
from tokenlake.analyze import _probes, _report, _verdicts
from tokenlake.analyze._common import run_info
from tokenlake.analyze._roles import select_roles
from tokenlake.store import LakeError, write_run
from tokenlake.store.testing import probe_run, synthetic_probe_result, synthetic_run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    v = {"subset": "val5k"}  # the canonical subset the verdicts read by default
    write_run(root, "g", **synthetic_run(model="dinov2_g", params=1_100_000_000, blocks=2, **v))
    write_run(root, "s", **synthetic_run(model="dinov2_s", params=22_000_000, outlier_norm=60.0,
                                         seed=1, **v))
    write_run(root, "rnd", **synthetic_run(attention="elsewhere", model="clip_b",
                                           params=86_000_000, random_weights=True, seed=2, **v))
    out = tmp_path_factory.mktemp("report")
    return root, out, analyze.report(root, out=out)


class _Page(HTMLParser):
    """Headings (level, text), tables (row counts), images and the visible text of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.tables, self.images, self.text = [], [], [], []
        self._heading, self._rows, self._skip = None, None, 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if re.fullmatch(r"h[1-6]", tag):
            self._heading = (int(tag[1]), [])
        elif tag == "table":
            self._rows = 0
        elif tag == "tr" and self._rows is not None:
            self._rows += 1
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag in ("style", "nav"):
            self._skip += 1

    def handle_endtag(self, tag):
        if re.fullmatch(r"h[1-6]", tag) and self._heading:
            self.headings.append((self._heading[0], "".join(self._heading[1]).strip()))
            self._heading = None
        elif tag == "table":
            self.tables.append(self._rows)
            self._rows = None
        elif tag in ("style", "nav"):
            self._skip -= 1

    def handle_data(self, data):
        if self._heading:
            self._heading[1].append(data)
        if not self._skip:
            self.text.append(data)


def _md_plain(text: str) -> str:
    """Markdown inline text as it reads: escapes, bold/italic marks and code ticks removed."""
    text = re.sub(r"\\(.)", r"\1", text.replace("**", "").replace("`", ""))
    return htmllib.unescape(text)


def test_html_is_the_markdown_rendered(built):
    """One source: every Markdown heading is an HTML heading of the same level and text, in the
    same order; every Markdown table an HTML table of as many rows; every linked figure
    embedded; and no Markdown syntax is left in the page's text."""
    _, out, _ = built
    md = (out / "report.md").read_text()
    page = _Page((out / "report.html").read_text())
    lines = md.split("\n")
    fenced = False
    heads, tables, rows = [], [], 0
    for line in lines + [""]:
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if m := re.match(r"(#{1,6}) (.*)$", line):
            heads.append((len(m.group(1)), _md_plain(m.group(2))))
        if line.startswith("|"):
            rows += 1
        elif rows:
            tables.append(rows - 1)  # less the alignment row
            rows = 0
    assert page.headings == heads and len(heads) > 20
    assert page.tables == tables and len(tables) > 10
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(page.images) == len(figures) >= 9
    for src, link in zip(page.images, figures, strict=True):
        assert src == "data:image/png;base64," + __import__("base64").b64encode(
            (out / link).read_bytes()).decode()
    text = "".join(page.text)
    assert "**" not in text and "](" not in text and "\\|" not in text


def test_files_and_embedded_figures(built):
    _, out, _res = built
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert html.count("data:image/png;base64,") >= 7  # maps, norms, size, nbrs, artifacts x2, blocks
    assert "<nav>" in html and "Contents" in html and "<figcaption>" in html
    assert "](analysis/maps.png)" in md and (out / "analysis" / "maps.csv").exists()
    assert "<figure><img" in html and "src=\"analysis/" not in html  # self-contained
    nav = html.split("<nav>")[1].split("</nav>")[0]
    assert nav.count("<li>") == md.count("\n## ")  # a contents line per section
    assert '<a href="#verdicts-on-the-papers-claims">' in nav


def test_random_weights_banner(built):
    _, out, _ = built
    html = (out / "report.html").read_text()
    banner = html.split('<div class="banner">')[1].split("</div>")[0]
    assert "RANDOM WEIGHTS: rnd" in banner and "untrained networks" in banner
    assert html.index('class="banner"') < html.index("<h1")
    assert "**RANDOM WEIGHTS: rnd**" in (out / "report.md").read_text()
    assert "position:sticky" in html


def test_verdict_badges_and_text_tables(built):
    _, out, _ = built
    html = (out / "report.html").read_text()
    assert re.search(r'<h3 id="[^"]+">Claim 1 — artifacts are high-norm outlier tokens: '
                     r'<span class="v ok">holds</span></h3>', html)
    # the verdict tables are text: every cell left-aligned; number columns right-aligned
    verdicts = html.split('id="verdicts-on-the-papers-claims"')[1].split("<h2")[0]
    assert 'style="text-align: right;"' not in verdicts and 'text-align: left;' in verdicts
    norms = html.split('<h2 id="token-norm-distributions')[1].split("<h2")[0]
    assert '<td style="text-align: right;">0.02</td>' in norms


def test_markdown_text_renders_as_itself():
    """_md: run names, messages and tokenlake's sentences come out of Markdown as they went in,
    in a paragraph and in a table cell; `code spans` become code."""
    import markdown

    tricky = ["dinov2_g_reg4 * 2 = [x] _y_ a|b", "<div> & &amp; x<y> #1 \\ *", "- 1. > list?",
              "100% of 3 < 5 _reg4 `--blocks all` ok", "[a](b) ![c](d) [e][f] [g]: h [RANDOM]"]
    for s in tricky:
        want = s.replace("`", "")
        got = markdown.markdown(_report._md(s, block=True), extensions=["tables"])
        assert got.startswith("<p>") and "".join(_Page(got).text) == want, (s, got)
        got = markdown.markdown(_report._table([s], [[s]]), extensions=["tables"])
        cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", got)
        assert ["".join(_Page(c).text) for c in cells] == [want, want], (s, got)
    assert "<code>--blocks all</code>" in markdown.markdown(_report._md(tricky[3]))
    assert _report._md("run [RANDOM WEIGHTS]") == "run [RANDOM WEIGHTS]"  # no escape needed


def test_verdicts_computed_from_the_data(built):
    _, out, res = built
    c = res["claims"]
    c1 = res["verdicts"]["Claim 1 — artifacts are high-norm outlier tokens"]
    # g: attention on its outliers (holds); s: 3 outliers at norm 60 among norms 10-20 are too few
    # and too close for a second mode (BC(ln norm) <= 5/9): not applicable; rnd: random weights
    assert c1["verdict"] == "holds"
    assert {k: e["verdict"] for k, e in c1["runs"].items()} == {
        "g": "holds", "s": "not applicable", "rnd": "random weights: not evidence"}
    assert c["Claim 3 — high-norm tokens sit in redundant areas"] == "holds"
    # dinov2 family: g (1.1B, norm 1000) is far more extreme than s (22M, norm 60): holds
    assert c["Claim 2 — large models (>300M) grow high-norm tokens"] == "holds"
    assert c["Claim 4 — high-norm tokens lose local, hold global information"] == "not enough data"
    html = (out / "report.html").read_text()
    assert "top-k agreement 1 (3 of 3 outliers over 1 images)" in html
    assert "secondary: Jaccard(top-2 % attention, top-2 % norm) 1" in html
    assert "Rule: per run, N = an image's norm outliers" in html


def test_missing_pieces_listed_never_drawn(built):
    _root, out, res = built
    html = (out / "report.html").read_text()
    for n in range(1, 6):
        assert f"Table {n}" in html
    assert html.count("run <code>tokenlake probe …</code>") >= 5
    assert any("blocks for run s" in m for m in res["missing"])


def test_provenance_and_commands(built):
    root, out, _ = built
    md = (out / "report.md").read_text()
    assert "dinov2_g" in md and "1,100,000,000" in md and "RANDOM WEIGHTS" in md
    assert f"tokenlake analyze norms --lake {root}" in md
    assert f"tokenlake report --lake {root}" in md


def test_paper_tables_beside_reference(tmp_path):
    from tokenlake.store import open_lake

    for name, model in (("s", "dinov2_s"), ("g", "dinov2_g")):
        write_run(tmp_path, name, **synthetic_run(model=model, subset="val5k", n_images=2))
    # the names and units tokenlake.probes writes: accuracies in percent
    synthetic_probe_result(tmp_path, "s", "position",
                         values={("normal", "top1"): 30.0, ("outlier", "top1"): 20.0})
    synthetic_probe_result(tmp_path, "s", "reconstruct", values={("normal", "l2"): 400.0})
    synthetic_probe_result(tmp_path, "g", "heads", values={("image", "top1"): 86.0})
    lk = open_lake(tmp_path)
    infos = {r: run_info(lk, r) for r in ("s", "g")}
    use = _verdicts.probe_use(roles=select_roles(list(infos.values()), subset="val5k",
                                                 explicit=False), infos=infos)
    t = {x["key"]: x for x in _probes.paper_tables(lk, infos=infos, use=use)}
    t1 = t["table1_position"]["rows"][0]
    assert t1["paper_row"] == "DINOv2-S" and t1["ours"][:2] == [pytest.approx(30.0), pytest.approx(20.0)]
    assert t1["diff"][0] == pytest.approx(30.0 - 28.05) and t1["use"] == ""
    assert t["table2_reconstruction"]["rows"][0]["diff"][0] == pytest.approx(400 - 383.13)
    assert t["table3_classification"]["missing"].startswith("missing")
    t4 = t["table4_dinov2_linear_heads"]["rows"][0]
    assert t4["paper_row"] == "Giant" and t4["ours"] == [86.0, None]
    assert "not 'dinov2-eval'" in t4["use"]  # g was preprocessed with the model's own recipe
    assert _probes.reference()["table4_dinov2_linear_heads"]["Giant"] == [86.90, 87.29]


def test_report_shows_real_probe_results_beside_the_paper(tmp_path):
    """End to end: a probe writes probe_results, the report reads the very same numbers."""
    from tokenlake.analyze import report
    from tokenlake.probes import position
    from tokenlake.store import open_lake

    probe_run(n_images=60, grid=8, seed=0).write(tmp_path, "planted")
    result = position(tmp_path, "planted", quiet=True, max_epochs=3, lrs=(0.01,))
    top1 = result["metrics"]["normal"]["top1"]
    stored = open_lake(tmp_path).sql(
        "SELECT value FROM probe_results WHERE probe = 'position' AND token_group = 'normal' "
        "AND metric = 'top1'").column(0)[0].as_py()
    assert stored == pytest.approx(top1)
    md = Path(report(tmp_path, out=tmp_path / "report")["md"]).read_text()
    table1 = md.split("## Table 1")[1].split("## Table 2")[0]
    assert "planted" in table1 and f"{top1:.3g}" in table1


# -- bugs and missing data ------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    from tokenlake.cli import _analyze_cmd

    parser = argparse.ArgumentParser(prog="tokenlake")
    _analyze_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _job_raises(monkeypatch, key: str, err: Exception) -> None:
    def job(*a, **k):
        raise err

    monkeypatch.setattr(_report, "JOBS", tuple((k, t, job if k == key else fn)
                                               for k, t, fn in _report.JOBS))


def test_a_bug_is_shown_the_report_written_and_the_command_exits_1(built, tmp_path, monkeypatch,
                                                                   capsys):
    root, _, _ = built
    _job_raises(monkeypatch, "neighbours", ZeroDivisionError("planted bug"))
    assert _cli(["report", "--lake", str(root), "--out", str(tmp_path / "cli")]) == 1
    assert "neighbours failed: ZeroDivisionError: planted bug" in capsys.readouterr().err
    res = analyze.report(root, out=tmp_path / "api")
    assert [(e["part"], e["error"]) for e in res["errors"]] == [
        ("neighbours", "ZeroDivisionError: planted bug")]
    assert "Traceback (most recent call last)" in res["errors"][0]["traceback"]
    assert not any("neighbours" in m for m in res["missing"])  # a bug is not missing data
    md = (tmp_path / "api" / "report.md").read_text()
    html = (tmp_path / "api" / "report.html").read_text()
    assert "\n## Errors\n" in md and "### neighbours: ZeroDivisionError: planted bug" in md
    assert 'raise err' in md.split("## Errors")[1].split("## Verdicts")[0]  # the traceback
    assert '<h2 id="errors">Errors</h2>' in html and "planted bug" in html
    # everything else is still there; the claim that needed the job says why it has no data
    assert "## Token-norm distributions" in md and "## Claim 1 — attention vs norm artifacts" in md
    c3 = res["verdicts"][_verdicts.C3]
    assert c3["verdict"] == _verdicts.NODATA and "see Errors" in c3["note"]


def test_missing_data_is_listed_and_the_command_exits_0(built, tmp_path, monkeypatch, capsys):
    root, _, _ = built
    _job_raises(monkeypatch, "maps", LakeError("maps: no input is present in every chosen run"))
    assert _cli(["report", "--lake", str(root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "missing: maps: LakeError: maps: no input is present" in out.out
    assert "error" not in out.err
    md = (tmp_path / "report.md").read_text()
    assert "## Errors" not in md and "- maps: LakeError: maps: no input is present" in md
    assert "## Feature and attention maps" not in md and "## Token-norm distributions" in md
