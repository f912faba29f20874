"""``mmpetl diff REV_A REV_B``: how the results tables changed between two git revisions.

Reads every ``results/tables/*.csv`` (the long layout written by ``harness.tables.render``) at
both revisions with ``git show REV:path`` and reports, as Markdown, per table and cell by cell
(key: section, row, column): our value (mean ± std, n), the paper's value, the significance
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

KEY = ("section", "row", "column")
#: fields compared, in report order (the first ones get their own columns)
WATCHED = ("status", "mean", "std", "n", "t_ci_low", "t_ci_high", "paper", "diff_vs_paper",
           "tunable_ours", "tunable_paper", "compared_to", "n_paired", "improvement", "p_t",
           "p_holm", "p_wilcoxon", "wilcoxon_min_p", "p_better", "verdict", "metric_key",
           "convention")
OWN_COLUMNS = ("status", "mean", "std", "n", "verdict", "p_holm")


def _git(repo, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    except OSError as error:  # git missing
        raise InputError("cannot run git", expected="git on PATH", found=str(error)) from error


def _resolve(repo, rev: str, which: str) -> str:
    if not isinstance(rev, str) or not rev or rev.startswith("-"):
        raise InputError("bad git revision", key=which, expected="a commit, branch or tag",
                         found=repr(rev))
    result = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if result.returncode != 0:
        inside = _git(repo, "rev-parse", "--git-dir")
        if inside.returncode != 0:
            raise InputError("not a git repository", file=str(repo),
                             expected="a git working tree", found=inside.stderr.strip())
        raise InputError("unknown git revision", file=str(Path(repo).resolve()), key=which,
                         expected="a commit, branch or tag of the repository", found=rev)
    return result.stdout.strip()


def _tables_at(repo, commit: str, tables_dir: str) -> dict[str, list[dict]]:
    listing = _git(repo, "ls-tree", "--name-only", f"{commit}:{tables_dir}")
    if listing.returncode != 0:  # the folder does not exist at that revision
        return {}
    tables = {}
    for name in sorted(listing.stdout.split("\n")):
        if not name.endswith(".csv"):
            continue
        path = f"{tables_dir}/{name}"
        shown = _git(repo, "show", f"{commit}:{path}")
        if shown.returncode != 0:
            raise InputError("cannot read table at revision", file=path, key=commit,
                             expected="a CSV file", found=shown.stderr.strip())
        reader = csv.DictReader(io.StringIO(shown.stdout))
        tables[name[:-4]] = list(reader)
    return tables


def _key(line: dict) -> tuple:
    return tuple(line.get(k, "") for k in KEY)


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
    before = {_key(line): line for line in old}
    after = {_key(line): line for line in new}
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
        for (section, row, column), a, b, fields in changed:
            others = "; ".join(f"{f}: {_short(a.get(f, ''))} → {_short(b.get(f, ''))}"
                               for f in fields if f not in OWN_COLUMNS)
            lines.append(" | ".join([
                f"| {section}", row, column, _ours(a), _ours(b),
                _delta(a, b) if a.get("status") == b.get("status") == "ok" else "—",
                _arrow(a.get("verdict", ""), b.get("verdict", "")),
                _arrow(a.get("p_holm", ""), b.get("p_holm", "")),
                (others or "—") + " |"]))
        lines.append("")
    for label, keys, source in (("Added", added, after), ("Removed", removed, before)):
        if keys:
            lines += [f"{label} cells:", ""]
            lines += [f"- {section} / {row} / {column}: {_ours(source[(section, row, column)])}"
                      for section, row, column in keys]
            lines.append("")
    return lines


def diff_tables(rev_a: str, rev_b: str, repo=".", tables_dir: str = "results/tables") -> str:
    """Markdown report of how ``<tables_dir>/*.csv`` changed from ``rev_a`` to ``rev_b``."""
    commit_a = _resolve(repo, rev_a, "REV_A")
    commit_b = _resolve(repo, rev_b, "REV_B")
    old = _tables_at(repo, commit_a, tables_dir)
    new = _tables_at(repo, commit_b, tables_dir)
    lines = [f"# Results tables: {rev_a} ({commit_a[:10]}) → {rev_b} ({commit_b[:10]})", ""]
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
        lines += [f"No table in {tables_dir} changed."]
    lines += body
    return "\n".join(lines).rstrip("\n") + "\n"
