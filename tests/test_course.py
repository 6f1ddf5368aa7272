"""The course follows its outline and keeps its promises to learners and teachers.

What the notebooks must hold (tests/test_notebooks.py runs them): the outline's section number and Chinese name in
every title, bilingual headings, 2-4 exercises each with a solution cell that asserts its answer, a summary in
Chinese and in English, a list of references with every cited paper linked (arXiv where the paper is there), the
library file the notebook steps through, and no measured number typed into Markdown (numbers a run measures are
printed by cells). The outline-to-notebook map is in notebook 01, the README and the Chinese README, and the figures
module draws every figure it offers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
ids = [p.stem for p in NOTEBOOKS]
CJK = re.compile(r"[\u4e00-\u9fff]")

# the outline's sections and the papers it names, with the notebooks that must cite them (by arXiv id)
OUTLINE_PAPERS = {
    "05_sft": ["2303.15647"],  # the survey (微调技术综述)
    "06a_bitfit": ["2106.10199"],
    "06b_prompt_tuning": ["2104.08691"],
    "06c_p_tuning": ["2103.10385", "2110.07602"],
    "06d_prefix_tuning": ["2101.00190", "2110.07602"],
    "06e_lora": ["2106.09685"],
    "06f_ia3": ["2205.05638"],
    "06g_adapters": ["1902.00751"],
    "07_comparison": ["2303.15647"],
}
TITLE_SECTIONS = {  # the outline number each notebook's title carries
    "01_pipeline": "2.1", "02_tokenization": "2.2", "03_gpt": "2.2", "04_pretraining": "2.2", "05_sft": "2.3",
    "06a_bitfit": "2.3.1", "06b_prompt_tuning": "2.3.2", "06c_p_tuning": "2.3.3", "06d_prefix_tuning": "2.3.4",
    "06e_lora": "2.3.5", "06f_ia3": "2.3.6", "06g_adapters": "2.3.7", "07_comparison": "2.3", "08_reward_model": "2.4.1",
    "09_ppo": "2.4.2", "10_dpo": "2.4.2", "11_grpo": "2.4.2",
}


def cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    for c in nb["cells"]:
        c["text"] = c["source"] if isinstance(c["source"], str) else "".join(c["source"])
    return nb["cells"]


def markdown(path: Path) -> list[str]:
    return [c["text"] for c in cells(path) if c["cell_type"] == "markdown"]


def prose(text: str) -> str:
    """Markdown without what may hold numbers that are not measurements: math, code, links, headings, paper ids."""
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    text = re.sub(r"\$[^$]*\$", " ", text)
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(r"^#+ .*$", " ", text, flags=re.M)  # headings carry outline numbers
    text = re.sub(r"arXiv:\d{4}\.\d{4,5}|doi:\S+", " ", text)
    text = re.sub(r"\b(?:Section|section|Figure|Table|eq\.|equation)s? \d+(?:\.\d+)*", " ", text)
    text = re.sub(r"(?<![\d.])[2-6]\.\d(?:\.\d)?(?= ?[\u4e00-\u9fff]| [A-Z]|-2\.)", " ", text)  # "2.4 强化学习", "2.3.1 BitFit"
    return text


MEASURED = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?%|(?<![\w.])\d+\.\d+(?![\w.])")


# -- each notebook ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_title_carries_the_outline_number_and_a_chinese_name(path):
    title = markdown(path)[0].splitlines()[0]
    stem = path.stem
    assert title.startswith(f"# {stem[:3].rstrip('_')} · "), f"{path.name}: the title must start with its number: {title!r}"
    assert TITLE_SECTIONS[stem] in title, f"{path.name}: the title must carry outline section {TITLE_SECTIONS[stem]}"
    assert CJK.search(title) and re.search(r"[A-Za-z]{3}", title), f"{path.name}: the title needs Chinese and English"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_headings_are_bilingual(path):
    for text in markdown(path):
        for line in text.splitlines():
            if line.startswith("## "):
                assert CJK.search(line) and re.search(r"[A-Za-z]{3}", line), (
                    f"{path.name}: heading {line!r} needs its Chinese name beside the English")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_exercises_with_solutions_that_assert(path):
    cs = cells(path)
    [task] = [c["text"].split("## 练习 · Exercises")[1] for c in cs
              if c["cell_type"] == "markdown" and "## 练习 · Exercises" in c["text"]]
    n = len(re.findall(r"^\d\. \*\*", task, flags=re.M))
    assert 2 <= n <= 4, f"{path.name}: {n} exercises; the course has 2 to 4 per notebook"
    headers = [i for i, c in enumerate(cs) if c["cell_type"] == "markdown" and c["text"].startswith("**Solution ")]
    assert len(headers) == n, f"{path.name}: {n} exercises but {len(headers)} solutions"
    for k, i in enumerate(headers, start=1):
        assert cs[i]["text"].startswith(f"**Solution {k}.**"), f"{path.name}: solution {k} out of order"
        code = cs[i + 1]
        assert code["cell_type"] == "code" and "solution" in code["metadata"].get("tags", []), (
            f"{path.name}: solution {k} needs a code cell tagged solution right after its heading")
        assert "assert" in code["text"], f"{path.name}: solution {k} must check its answer against the library"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_summary_in_chinese_and_english(path):
    [summary] = [t.split("## 小结 · Summary")[1] for t in markdown(path) if "## 小结 · Summary" in t]
    assert "**小结.**" in summary and "**Summary.**" in summary
    zh = summary.split("**小结.**")[1].split("**Summary.**")[0]
    assert len(CJK.findall(zh)) > 40, f"{path.name}: the Chinese summary is missing or too short"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_every_cited_paper_is_linked(path):
    texts = markdown(path)
    refs = [t for t in texts if "## 参考文献 · References" in t]
    assert refs, f"{path.name}: no references section"
    references = refs[-1].split("## 参考文献 · References")[1]
    entries = []  # one per "- " item, its continuation lines (indented) joined to it
    for line in references.splitlines():
        if line.startswith("- "):
            entries.append(line)
        elif line.startswith("  ") and entries:
            entries[-1] += " " + line.strip()
    assert entries and all("](http" in e for e in entries), f"{path.name}: every reference needs a link"
    for link in re.findall(r"https?://arxiv\.org/\S+?\)", references):
        assert re.fullmatch(r"https://arxiv\.org/abs/\d{4}\.\d{4,5}\)", link), f"{path.name}: odd arXiv link {link}"
    body = "\n".join(texts).split("## 参考文献 · References")[0]
    cited = set(re.findall(r"\b([A-Z][a-z]+(?:[ -][A-Z][a-z]+)?) et al\.,? (\d{4})", body))
    cited |= set(re.findall(r"\b([A-Z][a-z]+) (?:and|&) [A-Z][a-z]+,? \(?(\d{4})", body))
    for author, year in cited:
        assert any(author.split()[-1] in e and year in e for e in entries), (
            f"{path.name}: {author} {year} is cited but not in the references with a link")
    for arxiv_id in OUTLINE_PAPERS.get(path.stem, []):
        assert f"arxiv.org/abs/{arxiv_id}" in references, f"{path.name}: the outline's paper {arxiv_id} is not cited"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_names_the_library_file_and_shows_its_source(path):
    intro = markdown(path)[0]
    assert re.search(r"`(minigpt|peft|rlhf|benchmarks)/\w+\.py`", intro), (
        f"{path.name}: the introduction must name the library file the notebook steps through")
    code = "\n".join(c["text"] for c in cells(path) if c["cell_type"] == "code")
    assert "course.show_source(" in code, f"{path.name}: show the key library function (course.show_source)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_no_measured_number_in_markdown(path):
    """A number a run measures goes in a cell's output, where a re-run updates it; in Markdown it would go stale.
    Math, code, links and the outline's section numbers may hold numbers."""
    found = []
    for text in markdown(path):
        for m in MEASURED.finditer(prose(text)):
            found.append(m.group())
    assert not found, f"{path.name}: numbers typed into Markdown (print them from a cell instead): {found}"


# -- the course as a whole -------------------------------------------------------------------------------------------


def test_the_outline_map_names_every_notebook():
    intro = markdown(NOTEBOOK_DIR / "01_pipeline.ipynb")[0]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reading order of the notebooks")[1].split("\n## ")[0]
    zh = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    for where, text in (("notebook 01", intro), ("README.md", section), ("README.zh-CN.md", zh)):
        for stem in ids:
            assert f"`{stem}`" in text, f"{where}: the outline map does not name {stem}"
        for number in ("2.1", "2.2", "2.3", "2.3.1", "2.3.7", "2.4.1", "2.4.2"):
            assert number in text, f"{where}: the outline map lacks section {number}"
    assert "not part of this course" in intro and "not part of this course" in section
    assert "不属于本课程" in zh


def test_the_four_stage_table_has_the_outline_rows():
    text = markdown(NOTEBOOK_DIR / "01_pipeline.ipynb")[1]
    for row in ("数据集 data", "算法 algorithm", "模型 model", "资源需求 resources"):
        assert f"**{row}**" in text, f"the four-stage table lacks the row {row}"


def test_the_chinese_readme_has_the_commands_and_how_to_run_the_notebooks():
    zh = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    for needed in ("make demo", "make test", "make notebooks", "jupyter", "minigpt/", "peft/", "rlhf/", "notebooks/"):
        assert needed in zh, f"README.zh-CN.md lacks {needed!r}"
    assert not MEASURED.search(prose(zh)), "README.zh-CN.md: measured numbers belong in the English README's results"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "README.zh-CN.md" in readme.split("\n## ")[0], "the README's opening must point to the Chinese README"


def test_the_figures_module_draws_every_figure(tmp_path, monkeypatch):
    import sys

    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(NOTEBOOK_DIR))
    import figures

    for method in figures.METHOD_NAMES:
        figures.block_diagram(method)
    figures.pipeline_diagram()
    for kind in figures.LOOPS:
        figures.rl_loop(kind)
    figures.mixed_task_batch()
    drawn = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert len(drawn) == len(figures.METHOD_NAMES) + 1 + len(figures.LOOPS) + 1, drawn
    with pytest.raises(ValueError, match="unknown method"):
        figures.block_diagram("nope")
    sys.modules.pop("figures", None)
