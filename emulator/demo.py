"""`rtqcc demo`: the local stack, one sample job watched live in the terminal (a progress bar per
section and the text as it is written), and the finished manuscript written to a file."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn

from .client import RtqccClient
from .stack import LocalStack, StackOptions

DEMO_JOB = {
    "title": "Keeping Long Jobs Alive",
    "brief": "A short field guide for teams that generate long documents with language models: "
             "why jobs fail, how checkpoints and leases keep them alive, and how to watch them live.",
}
TAIL_CHARS = 600


def run_demo(*, sections: int, output: str | None, data_dir: str, port: int = 0) -> int:
    console = Console()
    environ = dict(os.environ)
    environ.setdefault("RTQCC_FAKE_TOKENS_PER_S", "120")
    console.print("starting the local stack (embedded services where none is configured) ...")
    stack = LocalStack(StackOptions(port=port, data_dir=Path(data_dir), consumers=2), environ)
    stack.start()
    try:
        console.print(f"gateway at [bold]{stack.base_url}[/] (open it in a browser to watch), "
                      f"API key [bold]{stack.api_key}[/]")
        with RtqccClient(stack.base_url, stack.api_key) as client:
            return _run_job(console, client, sections=sections, output=output)
    finally:
        stack.stop()


def _run_job(console: Console, client: RtqccClient, *, sections: int, output: str | None) -> int:
    external_id = client.create(**DEMO_JOB, section_count=sections)["externalId"]
    client.control(external_id, "start")
    console.print(f"job [bold]{external_id}[/] started\n")

    progress = Progress(TextColumn("{task.description}", style="bold"), BarColumn(),
                        TextColumn("{task.fields[note]}"), console=console)
    bars: dict[int, int] = {}
    texts: dict[int, str] = {}
    current = {"index": None, "title": "outline"}
    expected_chars = 900  # a section's usual length: the bar's scale until the section completes

    def view():
        text = texts.get(current["index"], "") if current["index"] is not None else "drafting the outline ..."
        return Group(progress, Panel(text[-TAIL_CHARS:], title=str(current["title"]), height=12))

    status = "unknown"
    with Live(view(), console=console, refresh_per_second=12) as live:
        for event in client.events(external_id):
            data = event.data
            if event.type == "outline":
                for entry in data["sections"]:
                    bars[entry["index"]] = progress.add_task(f"{entry['index'] + 1}. {entry['title'][:40]}",
                                                             total=expected_chars, note="waiting")
            elif event.type == "section.started":
                current.update(index=data["index"], title=data["title"])
                texts[data["index"]] = texts.get(data["index"], "")[: data["resumed_chars"]]
                progress.update(bars[data["index"]], note="writing")
            elif event.type == "section.delta":
                texts[data["index"]] = texts.get(data["index"], "") + data["text"]
                progress.update(bars[data["index"]], completed=min(len(texts[data["index"]]), expected_chars - 1))
            elif event.type == "section.completed":
                progress.update(bars[data["index"]], completed=expected_chars,
                                note=f"{data['usage']['total_tokens']} tokens")
            elif event.type == "done":
                status = data["status"]
            live.update(view())
    if status != "completed":
        console.print(f"job ended {status}", style="red")
        return 1
    manuscript = client.manuscript(external_id)
    usage = client.get(external_id)["usage"]
    path = Path(output or f"manuscript-{external_id}.md")
    path.write_text(manuscript, encoding="utf-8")
    console.print(f"\nmanuscript written to [bold]{path}[/] ({len(manuscript)} characters, "
                  f"{usage['total_tokens']} tokens{' (estimated)' if usage['estimated'] else ''})")
    return 0
