"""The report as a document: blocks written as Markdown (tables by tabulate), and the same Markdown
rendered to one self-contained HTML file by Python-Markdown, with the figures inlined.
"""

import base64
import html
import re
from pathlib import Path

import markdown
import pandas as pd

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
         "table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;"
         "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;"
         "padding:8px;font-size:12px;overflow-x:auto}blockquote{border-left:4px solid #c33;margin:1em 0;"
         "padding:.2em 1em;background:#fff4f4}")


def anchor(title: str) -> str:
    """GitHub's heading anchor, so the table of contents links work on GitHub and in the HTML alike."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title.lower()).strip())


class Document:
    """Blocks of Markdown; tables also go to tables/<name>.csv, figures are PNGs under figures/."""

    def __init__(self, out: Path):
        self.out = out
        self.blocks: list[str] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append("#" * level + " " + text)

    def text(self, text: str) -> None:
        self.blocks.append(text)

    def note(self, text: str) -> None:
        self.blocks.append(f"_{text}_")

    def warning(self, text: str) -> None:
        self.blocks.append("> " + text)

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append("\n".join(f"- {item}" for item in items))

    def code(self, text: str, summary: str | None = None) -> None:
        block = "```\n" + text.rstrip() + "\n```"
        self.blocks.append(f"<details><summary>{summary}</summary>\n\n{block}\n\n</details>" if summary else block)

    def table(self, name: str, shown: pd.DataFrame, data: pd.DataFrame | None = None, caption: str = "") -> None:
        """`shown` goes in the document; `data` (raw numbers, default `shown`) to tables/<name>.csv."""
        path = self.out / "tables" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        (shown if data is None else data).to_csv(path, index=False)
        body = shown.astype(str).map(lambda v: v.replace("|", "\\|").replace("\n", " "))
        head = f"{caption} " if caption else ""
        self.blocks.append(f"{head}([CSV](tables/{name}.csv))\n\n"
                           + body.to_markdown(index=False, tablefmt="pipe", disable_numparse=True))

    def figure_path(self, name: str) -> Path:
        return self.out / "figures" / f"{name}.png"

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(f"![{caption}]({path.relative_to(self.out).as_posix()})\n\n_{caption}_")

    def markdown(self) -> str:
        return "\n\n".join(self.blocks) + "\n"

    def html(self, title: str) -> str:
        text, front = self.markdown(), ""
        if text.startswith("---\n"):  # YAML front matter: shown as it is, not as rules and headings
            end = text.index("\n---\n", 4)
            front, text = f"<pre>{html.escape(text[4:end])}</pre>", text[end + 5:]
        body = front + markdown.markdown(text, extensions=["tables", "fenced_code", "md_in_html", "toc"],
                                         extension_configs={"toc": {"slugify": lambda text, _sep: anchor(text)}})

        def inline(match: re.Match) -> str:
            data = base64.b64encode((self.out / match.group(1)).read_bytes()).decode()
            return f'src="data:image/png;base64,{data}"'

        body = re.sub(r'src="(figures/[^"]+\.png)"', inline, body)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
                f"</head><body>{body}</body></html>\n")
