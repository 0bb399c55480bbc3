"""benchmarks.run --readme: the report lands between the README's markers."""

import pytest

from benchmarks import run

REPORT = ("## tfdssm benchmarks\n\nMachine: x\n\n### Quality\n\n| a |\n|---|\n| 1 |\n\n"
          "![Recall@K](results/recall_at_k.png)\n")


def test_update_readme_replaces_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run.START}\nold table\n{run.END}\n\n## Layout\nkept\n")
    run.update_readme(readme, REPORT)
    text = readme.read_text()
    assert text.startswith(f"intro\n{run.START}\nMachine: x\n")
    assert "old table" not in text and "## tfdssm benchmarks" not in text
    assert "](benchmarks/results/recall_at_k.png)" in text
    assert text.endswith(f"| 1 |\n\n![Recall@K](benchmarks/results/recall_at_k.png)\n"
                         f"{run.END}\n\n## Layout\nkept\n")
    run.update_readme(readme, REPORT)  # idempotent
    assert readme.read_text() == text


def test_update_readme_without_markers_says_so(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- bench:start -->"):
        run.update_readme(readme, REPORT)
    assert readme.read_text() == "no markers\n"


def test_readme_needs_a_full_run(capsys):
    with pytest.raises(SystemExit):
        run.main(["--quick", "--readme", "README.md"])
    assert "full run" in capsys.readouterr().err


def test_a_page_under_docs_gets_plot_paths_relative_to_it(tmp_path):
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(f"# Benchmarks\n{run.START}\n{run.END}\n")
    run.update_readme(page, REPORT)
    assert "](../benchmarks/results/recall_at_k.png)" in page.read_text()
    assert (tmp_path / "docs" / "../benchmarks").resolve() == tmp_path / "benchmarks"


def test_the_repository_page_has_the_markers():
    page = run.pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    text = page.read_text()
    assert run.START in text and run.END in text
