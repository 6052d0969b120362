"""Wall time of the `sparsefx diff` command on the issue's models (bar: under 30 s on CPU).

    python benchmarks/diff_time.py [--models mobilenet_v2,hf_resnet,gpt2] [--density 0.25]

Runs the installed console script as a user would (a fresh process: imports, capture,
analysis, passes, fake-tensor shapes, text and the HTML report) for each model of
`examples/models.py`, in both modes, one after the other, and prints a table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import environment, format_table

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models.py"
MODES = ("transform", "compile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,hf_resnet,gpt2")
    parser.add_argument("--density", default="0.25")
    args = parser.parse_args()
    script = Path(sys.executable).with_name("sparsefx")
    print(" | ".join(f"{k}: {v}" for k, v in environment().items()))
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for model in args.models.split(","):
            for mode in MODES:
                html = Path(out) / f"{model}-{mode}.html"
                command = [str(script), "diff", f"{EXAMPLES}:{model}", "--density", args.density]
                command += ["--mode", mode, "--html", str(html)]
                start = time.perf_counter()
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                seconds = time.perf_counter() - start
                if result.returncode:
                    sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
                lines = result.stdout.count("\n")
                rows.append(
                    [model, mode, f"{seconds:.1f}", str(lines), f"{html.stat().st_size // 1024}"]
                )
    print(format_table(["model", "mode", "seconds", "text lines", "HTML KiB"], rows))


if __name__ == "__main__":
    main()
