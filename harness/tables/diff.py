"""``mmpetl diff [REV_A [REV_B]]``: how the results tables and leaderboards changed between two
revisions, as ``dvc metrics diff`` takes them: a git commit, branch or tag, a DVC experiment's
name (``dvc exp show``; its ref under ``refs/exps``) or ``workspace`` (the files on disk);
REV_A defaults to HEAD, REV_B to the workspace.

Reads every ``results/tables/*.csv`` and ``results/leaderboards/*.csv`` (the long layout written
by ``harness.tables.render``) at both revisions (``git show REV:path``, or the file on disk for
the workspace) and reports, as Markdown, per table and cell by cell
(key: section, row, column and its metric key: MSR-VTT's R@5 is a column of text-to-video and
of video-to-text): our value (mean ± std, n), the paper's value, the significance
verdict, the Holm-adjusted p and every other field that changed; rows added or removed; tables
added or removed. An unknown revision (or a folder that is not a git repository) raises
``InputError`` (the CLI exits non-zero).
"""
from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

from harness.errors import InputError

KEY = ("section", "row", "column", "metric_key")
PLANTED_KEY = ("task", "row", "metric")  # the planted tasks' table's (``_in_long_layout``)
#: fields compared, in report order (the first ones get their own columns)
WATCHED = ("status", "mean", "std", "n", "t_ci_low", "t_ci_high", "paper", "diff_vs_paper",
           "tunable_ours", "tunable_paper", "compared_to", "n_paired", "improvement", "p_t",
           "p_holm", "p_wilcoxon", "wilcoxon_min_p", "p_better", "verdict",
           "convention", "outcome", "holds")
OWN_COLUMNS = ("status", "mean", "std", "n", "verdict", "p_holm")


def _git(repo, *args: str, text: bool = True) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=text)
    except OSError as error:  # git missing
        raise InputError("cannot run git", expected="git on PATH", found=str(error)) from error


WORKSPACE = "workspace"
DIRS = ("results/tables", "results/leaderboards")


def _experiment(repo, name: str) -> str | None:
    """The commit of the DVC experiment called ``name`` (refs/exps/.../<name>), None if none."""
    refs = _git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps")
    found = sorted({line.split()[0] for line in refs.stdout.splitlines()
                    if line.split() and line.split()[-1].rsplit("/", 1)[-1] == name})
    if len(found) > 1:
        raise InputError("ambiguous experiment name", file=str(Path(repo).resolve()), key=name,
                         expected="one experiment of that name (or give its commit)",
                         found=[c[:10] for c in found])
    return found[0] if found else None


def _resolve(repo, rev: str, which: str) -> str:
    """A commit sha, or WORKSPACE."""
    if not isinstance(rev, str) or not rev or rev.startswith("-"):
        raise InputError("bad revision", key=which,
                         expected="a commit, branch, tag, experiment name or workspace",
                         found=repr(rev))
    inside = _git(repo, "rev-parse", "--git-dir")
    if inside.returncode != 0:
        raise InputError("not a git repository", file=str(repo),
                         expected="a git working tree", found=inside.stderr.strip())
    if rev == WORKSPACE:
        return WORKSPACE
    result = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if result.returncode == 0:
        return result.stdout.strip()
    experiment = _experiment(repo, rev)
    if experiment is None:
        raise InputError("unknown revision", file=str(Path(repo).resolve()), key=which,
                         expected="a commit, branch or tag, a DVC experiment name (dvc exp "
                                  "show) or workspace", found=rev)
    return experiment


def _tables_at(repo, commit: str, tables_dir: str, where: str) -> dict[str, list[dict]]:
    """{name: lines} of the ``tables_dir/*.csv`` at ``commit`` (``where``: how to name it)."""
    if commit == WORKSPACE:
        folder = Path(repo) / tables_dir
        return {path.stem: _read_table(path.read_bytes(), str(path), where)
                for path in sorted(folder.glob("*.csv"))} if folder.is_dir() else {}
    listing = _git(repo, "ls-tree", "--name-only", f"{commit}:{tables_dir}")
    if listing.returncode != 0:  # the folder does not exist at that revision
        return {}
    tables = {}
    for name in sorted(listing.stdout.split("\n")):
        if not name.endswith(".csv"):
            continue
        path = f"{tables_dir}/{name}"
        shown = _git(repo, "show", f"{commit}:{path}", text=False)
        if shown.returncode != 0:
            raise InputError("cannot read table at revision", file=path, key=commit,
                             expected="a CSV file",
                             found=shown.stderr.decode(errors="replace").strip())
        tables[name[:-4]] = _read_table(shown.stdout, path, where)
    return tables


def _read_table(data: bytes, file: str, where: str) -> list[dict]:
    """The lines of a results table's CSV as {column: value}: UTF-8 text, a header naming the key
    columns (``KEY``, or the planted tasks' ``PLANTED_KEY``) and every line as many fields as the
    header. Anything else (a line cut short, a merge left unresolved) raises InputError naming
    the file, where it was read and the line."""
    def damaged(line: int, expected: str, found: str) -> InputError:
        return InputError(f"damaged results table (read at {where})", file=file, key=f"line {line}",
                          expected=expected, found=found)

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise damaged(data[:error.start].count(b"\n") + 1, "UTF-8 text",
                      f"the byte {data[error.start:error.start + 1]!r}") from None
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        numbered = [(reader.line_num, fields) for fields in reader if fields]
    except csv.Error as error:
        raise damaged(reader.line_num, "CSV as mmpetl writes it", str(error)) from None
    if not numbered:
        raise damaged(1, f"a header naming the columns {', '.join(KEY)}", "an empty file")
    (_, header), body = numbered[0], numbered[1:]
    required = PLANTED_KEY if "task" in header and "section" not in header else KEY
    missing = [column for column in required if column not in header]
    if missing:
        raise damaged(1, f"a header naming the columns {', '.join(required)}",
                      f"no {', '.join(missing)}")
    for line, fields in body:
        if len(fields) != len(header):
            raise damaged(line, f"{len(header)} fields, as the header",
                          f"{len(fields)}: {','.join(fields)[:60]!r}")
    return [dict(zip(header, fields)) for _, fields in body]


def _key(line: dict) -> tuple:
    return tuple(line.get(k, "") for k in KEY)


def _in_long_layout(line: dict) -> dict:
    """A line of the planted tasks' table (one per task, row and metric: ``row_mean`` against the
    probe) in the long layout's terms: the task as section, the metric as column."""
    if "section" in line or "task" not in line:
        return line
    return {**line, "section": line["task"], "column": line.get("metric", ""),
            "metric_key": line.get("metric", ""), "mean": line.get("row_mean", ""),
            "n": line.get("n_paired", "?"), "status": "ok"}


def _by_key(name: str, lines: list[dict]) -> dict[tuple, dict]:
    found = {}
    for line in map(_in_long_layout, lines):
        if _key(line) in found:  # two lines the report could not tell apart
            raise InputError("two lines of a results table share a key", file=name,
                             key=" / ".join(_key(line)), expected=f"one line per {KEY}",
                             found="two")
        found[_key(line)] = line
    return found


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _short(value: str) -> str:
    if value in ("", None):
        return "—"
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}"


def _ours(line: dict | None) -> str:
    if line is None:
        return "—"
    if line.get("status", "ok") != "ok":
        return line.get("status", "").split(":", 1)[0] or "—"
    text = _short(line.get("mean", ""))
    if line.get("std"):
        text += f" ± {_short(line['std'])}"
    return text + f" (n={line.get('n', '?')})"


def _delta(a: dict, b: dict) -> str:
    try:
        change = float(b["mean"]) - float(a["mean"])
        return f"{change:+.4g}" if change else "0"
    except (KeyError, TypeError, ValueError):
        return "—"


def _arrow(a: str, b: str) -> str:
    return _short(a) if _same(a, b) else f"{_short(a)} → {_short(b)}"


def _table_diff(name: str, old: list[dict], new: list[dict]) -> list[str]:
    before, after = _by_key(name, old), _by_key(name, new)
    added = [k for k in after if k not in before]
    removed = [k for k in before if k not in after]
    changed = []
    for key in (k for k in after if k in before):
        a, b = before[key], after[key]
        fields = [f for f in WATCHED if not _same(a.get(f, ""), b.get(f, ""))]
        if fields:
            changed.append((key, a, b, fields))
    if not (added or removed or changed):
        return []
    title = (new or old)[0].get("table", name)
    lines = [f"## {name} ({title})", "",
             f"{len(changed)} cell(s) changed, {len(added)} added, {len(removed)} removed.", ""]
    if changed:
        lines += ["| Section | Row | Column | ours before | ours after | Δ ours | verdict | "
                  "p (Holm) | other changes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (section, row, column, metric), a, b, fields in changed:
            others = "; ".join(f"{f}: {_short(a.get(f, ''))} → {_short(b.get(f, ''))}"
                               for f in fields if f not in OWN_COLUMNS)
            lines.append(" | ".join([
                f"| {section}", row, _column(column, metric), _ours(a), _ours(b),
                _delta(a, b) if a.get("status") == b.get("status") == "ok" else "—",
                _arrow(a.get("verdict", ""), b.get("verdict", "")),
                _arrow(a.get("p_holm", ""), b.get("p_holm", "")),
                (others or "—") + " |"]))
        lines.append("")
    for label, keys, source in (("Added", added, after), ("Removed", removed, before)):
        if keys:
            lines += [f"{label} cells:", ""]
            lines += [f"- {section} / {row} / {_column(column, metric)}: "
                      f"{_ours(source[(section, row, column, metric)])}"
                      for section, row, column, metric in keys]
            lines.append("")
    return lines


def _column(column: str, metric: str) -> str:
    """A column with the metric it shows (``R@5 (t2v_R5)``)."""
    return f"{column} ({metric})" if metric and metric != column else column


def _label(rev: str, commit: str) -> str:
    return rev if commit == WORKSPACE else f"{rev} ({commit[:10]})"


def _where(rev: str, commit: str) -> str:
    """Where a table was read: ``the workspace`` or ``revision HEAD (0123456789)``."""
    return "the workspace" if commit == WORKSPACE else f"revision {_label(rev, commit)}"


def diff_tables(rev_a: str = "HEAD", rev_b: str = WORKSPACE, repo=".",
                tables_dirs=DIRS) -> str:
    """Markdown report of how ``<dir>/*.csv`` of each of ``tables_dirs`` changed from ``rev_a``
    to ``rev_b`` (each a commit, branch, tag, DVC experiment name or ``workspace``)."""
    if isinstance(tables_dirs, str):
        tables_dirs = (tables_dirs,)
    commit_a = _resolve(repo, rev_a, "REV_A")
    commit_b = _resolve(repo, rev_b, "REV_B")
    old, new = {}, {}
    for folder in tables_dirs:
        prefix = "" if folder == tables_dirs[0] else f"{Path(folder).name}/"
        old.update({prefix + k: v for k, v in
                    _tables_at(repo, commit_a, folder, _where(rev_a, commit_a)).items()})
        new.update({prefix + k: v for k, v in
                    _tables_at(repo, commit_b, folder, _where(rev_b, commit_b)).items()})
    lines = [f"# Results tables: {_label(rev_a, commit_a)} → {_label(rev_b, commit_b)}", ""]
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    if added:
        lines += [f"Tables added: {', '.join(added)}", ""]
    if removed:
        lines += [f"Tables removed: {', '.join(removed)}", ""]
    body = []
    for name in sorted(set(old) & set(new)):
        body += _table_diff(name, old[name], new[name])
    if not (added or removed or body):
        lines += [f"No table in {', '.join(tables_dirs)} changed."]
    lines += body
    return "\n".join(lines).rstrip("\n") + "\n"
