"""What a launch's report leaves in MLflow and on disk, read back from a real SQLite store
(runs written as a launch's trials leave them: tests/support/mlflow_store.py): report.md and
report.html hold the same sections and numbers, the HTML with its figures inside; reference
rows are never tagged or registered as winners; the launch run's description names the
winners; a registered version is listed once on its run's page."""

from __future__ import annotations

import base64
import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support.mlflow_store import LAUNCH_ID, store_launch
from timematch.runner.launch_state import ExperimentFolder
from timematch.runner.registry import UNITY_CATALOG_SHAPE, register_best_models, registered_name
from timematch.runner.reporting import DESCRIPTION_TAG, MARKDOWN_PREFACE, build_report


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A launch of 2 seeds x (5 TimeMatch trials + the baseline), reported and registered as
    the launcher does it."""
    tmp = tmp_path_factory.mktemp("report-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIMEMATCH_CACHE", str(tmp / "cache"))
        stored = store_launch(tmp, trials=5, seeds=2)
        folder = ExperimentFolder(stored.results, stored.experiment)
        report = build_report(stored.uri, folder, launch_id=LAUNCH_ID)
        registered = register_best_models(stored.uri, stored.experiment, report, "target_val_f1", LAUNCH_ID)
    return stored, folder, report, registered


class _Page(HTMLParser):
    """The HTML report's headings, table cells (per table, row by row) and images."""

    def __init__(self):
        super().__init__()
        self.headings: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.sources: list[str] = []  # every src/href: none may leave the file
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.sources += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("h2", "td", "th"):
            self._text = []

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag in ("h2", "td", "th") and self._text is not None:
            text = "".join(self._text).strip()
            if tag == "h2":
                self.headings.append(text)
            else:
                self.tables[-1][-1].append(text)
            self._text = None


def _markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            cells = [cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):  # not the separator line
                current.append(cells)
        else:
            current = None
    return tables


def test_report_md_and_html_carry_the_same_sections_and_numbers_with_the_figures_inside(reported):
    stored, folder, report, _ = reported
    md_path, html_path, png_path = folder.report_files
    markdown, page_text = md_path.read_text(), html_path.read_text()
    page = _Page()
    page.feed(page_text)

    headings = [line[3:] for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == page.headings
    assert [h.split(":")[0].split(" (")[0] for h in headings] == [
        "Results", "Selection gap", "Paired comparison", "Hyper-parameter importance", "Sensitivity"]
    # every table, cell by cell (the numbers, the bold ones included), the same in both
    assert _markdown_tables(markdown) == page.tables and len(page.tables) == 4
    results = page.tables[0]
    assert results[0] == ["Method", "DK → FR1", "Avg"]
    assert results[1][0] == "source_only" and results[2] == ["timematch", "56.5 ± 0.5", "56.5"]
    # the notes under each table: each paragraph of the Markdown is in the HTML
    for paragraph in markdown.split("\n\n"):
        if paragraph and not paragraph.startswith(("|", "#", "!", "-", "The figures are linked")):
            assert f"<p>{html.escape(paragraph.strip())}</p>" in page_text, paragraph

    # the figures: linked by relative path in the Markdown, inside the HTML as data URIs
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert links == ["report.png", "sensitivity/DK-FR1_timematch.png"]
    assert len(page.images) == len(links) and all(src.startswith("data:image/png;base64,") for src in page.images)
    for link, src in zip(links, page.images):
        assert base64.b64decode(src.split(",", 1)[1]) == (md_path.parent / link).read_bytes(), link
    assert all(source.startswith("data:") for source in page.sources)  # the page needs no other file
    assert png_path.stat().st_size > 1000

    # both logged to the launch run, as written
    client = stored.client
    logged = {a.path for a in client.list_artifacts(stored.launch_run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/report.png"} <= logged
    copy = Path(client.download_artifacts(stored.launch_run_id, "report/report.html", str(folder.path / "dl")))
    assert copy.read_text() == page_text
    # the terminal prints the same, less the line on where the figures show
    assert MARKDOWN_PREFACE in markdown and report.markdown == markdown.replace(MARKDOWN_PREFACE + "\n\n", "")


def test_reference_rows_are_never_tagged_ranked_or_registered_as_winners(reported):
    stored, folder, _, registered = reported
    client = stored.client
    for seed in (0, 1):
        baseline = client.get_run(stored.runs[f"DK-FR1 SO s{seed}"]).data.tags
        # the baseline scores above every TimeMatch trial, and is still no winner
        assert baseline["best"] == "false" and baseline["rank"] == "reference"
        assert baseline["reference"] == "true" and baseline["reference_rank"] == "1"
        winner = client.get_run(stored.runs[f"DK-FR1 TM s{seed}#4"]).data.tags
        assert (winner["best"], winner["rank"], winner.get("reference")) == ("true", "1", None)
    found = client.search_runs([stored.experiment_id], "tags.best = 'true'")
    assert sorted(r.info.run_name for r in found) == ["DK-FR1 TM s0#4", "DK-FR1 TM s1#4"]
    assert not client.search_runs([stored.experiment_id], "tags.rank = '1' and tags.method = 'source_only'")

    # the registry: the reference model under the alias reference, never best
    name = registered_name(stored.experiment, "DK-FR1", "source_only")
    assert f"{name}@reference" in registered
    assert client.get_registered_model(name).aliases == {"reference": 1}
    version = client.get_model_version_by_alias(name, "reference")
    assert version.tags["reference"] == "true"
    timematch = registered_name(stored.experiment, "DK-FR1", "timematch")
    assert client.get_registered_model(timematch).aliases == {"best": 1}

    # and the words say the same as the tags, in the report and in the docs
    words = ("Reference rows (source_only) are never marked best: never bold here; in MLflow their trials are "
             "tagged reference=true, best=false and rank=reference, and their models registered with the alias "
             "reference.")
    assert words in folder.report_files[0].read_text()
    assert html.escape(words) in folder.report_files[1].read_text()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "mlflow.md").read_text()
    assert "`reference=true`" in docs and "`rank=reference`" in docs and "alias `reference`" in docs


def test_the_launch_runs_description_names_the_winners_and_points_to_the_report(reported):
    stored, _, _, _ = reported
    client = stored.client
    description = client.get_run(stored.launch_run_id).data.tags[DESCRIPTION_TAG]
    lines = description.splitlines()
    assert f"#/experiments/{stored.experiment_id}/runs/{stored.launch_run_id}/artifacts/report/report.html" \
           in lines[0] and "`target_val_f1`" in lines[0]
    timematch = next(line for line in lines if "**timematch**" in line)
    # the winner over both seeds by the objective (a tie: the first seed's), its scores and sampled values
    winner = client.get_run(stored.runs["DK-FR1 TM s0#4"])
    assert f"[DK-FR1 TM s0#4](#/experiments/{stored.experiment_id}/runs/{winner.info.run_id})" in timematch
    assert "target_val_f1 0.700, test_macro_f1 0.560" in timematch and "(the best over 2 folds x seeds)" in timematch
    assert lines.index(timematch) == 1  # the winners first, the reference rows after them
    for key, value in json.loads(winner.data.tags["sampled"]).items():
        assert f"{key}={value:.3g}" in timematch if isinstance(value, float) else f"{key}={value}" in timematch
    baseline = next(line for line in lines if "source_only" in line)
    assert "source_only (reference, never best)" in baseline and "DK-FR1 SO s0" in baseline and "defaults" in baseline
    assert len(lines) == 3 and len(description) < 1500  # short: a line per (scenario, method)


def test_a_registered_version_is_linked_once_to_its_run(reported):
    import mlflow

    stored, _, _, registered = reported
    client = stored.client
    name = registered_name(stored.experiment, "DK-FR1", "timematch")
    baseline = registered_name(stored.experiment, "DK-FR1", "source_only")
    assert sorted(registered) == sorted([f"{name}@best", f"{baseline}@reference"])
    winner = stored.runs["DK-FR1 TM s0#4"]
    # the two lists the run page merges (MLflow 3.17): the versions registered from the run, and
    # the versions its logged models name; one version, linked both ways
    versions = client.search_model_versions(f"run_id = '{winner}'")
    assert [(v.name, str(v.version)) for v in versions] == [(name, "1")]
    model_id = versions[0].source.removeprefix("models:/")
    assert json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [{"name": name, "version": 1}]
    # The page lists the two as one only when both link to /models/<name>/versions/1: a name of
    # three dotted parts is, to the UI, a Unity Catalog model, linked elsewhere, so listed twice.
    assert not UNITY_CATALOG_SHAPE.fullmatch(name)
    assert registered_name("a.b", "DK-FR1", "timematch") == "a.b-DK-FR1-timematch"  # two parts: kept
    assert not UNITY_CATALOG_SHAPE.fullmatch(registered_name("x", "A.B", "m.c"))
    build = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    if build.is_dir():  # the rule as the installed UI writes it (MLflow 3.17), where its bundle is installed
        rule = f"Boolean(e.match(/^{UNITY_CATALOG_SHAPE.pattern}$/))"
        assert any(rule in path.read_text(errors="ignore") for path in build.glob("*.js")), (
            "MLflow's UI no longer tells Unity Catalog names this way: look at a winner's run page again")
