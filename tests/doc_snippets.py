"""Code in the docs, extracted so that tests run it as a user would: the README's and a model card's
```python blocks and the ``TLCMScheduler`` docstring example, each in a fresh namespace of one new
interpreter (``run_snippets``), so that the docs cannot rot."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

RUNNER = r'''
import json, sys, traceback
results = {}
for s in json.load(open(sys.argv[1])):
    try:
        exec(compile(s["code"], s["name"], "exec"), dict(s.get("globals", {}), __name__="__main__"))
        results[s["name"]] = "ok"
    except BaseException:
        results[s["name"]] = traceback.format_exc()
print("SNIPPET-RESULTS " + json.dumps(results))
'''


def python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


def docstring_example(doc: str) -> str:
    """The indented literal block after the first line ending in ``::`` (reST)."""
    lines = doc.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.rstrip().endswith("::")) + 1
    block = []
    for ln in lines[start:]:
        if ln.strip() and not ln.startswith(" "):
            break
        block.append(ln)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


def run_snippets(snippets: list[dict], cwd: Path, env: dict, timeout: float = 600) -> dict[str, str]:
    """Run ``[{"name", "code", "globals"?}]`` in one fresh interpreter (cwd ``cwd``): ``{name: "ok" | traceback}``."""
    spec = Path(cwd) / ".snippets.json"
    spec.write_text(json.dumps(snippets))
    r = subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("SNIPPET-RESULTS ")), None)
    assert line is not None, f"snippet runner failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(line.removeprefix("SNIPPET-RESULTS "))
