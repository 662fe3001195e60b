"""Check that the README shows what its main command prints today (a script, not a test: it trains for
minutes).

    python tests/check_readme.py                          # runs `python train.py --seg` in a temp folder
    python tests/check_readme.py --run runs/synthetic_r3d_seg_s0   # a finished run of that command

Compares the README's example table (the block starting "runs/synthetic_r3d_seg_s0/...") line by line with
the table the command printed; prints a diff and exits 1 if they differ.
"""

import argparse
import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST, LAST = "runs/synthetic_r3d_seg_s0/predictions_test.csv", "macro ("


def table(text, name):
    """The lines from the one naming the predictions file to the macro line."""
    lines = [line.rstrip() for line in text.splitlines()]
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(FIRST))
        end = next(i for i in range(start, len(lines)) if lines[i].startswith(LAST))
    except StopIteration:
        sys.exit(f"{name}: no table starting with {FIRST!r}")
    return lines[start : end + 1]


def printed_table(run):
    """What the main command prints at its end; evaluate.py on its run folder prints the same table."""
    if run:
        command = [sys.executable, "evaluate.py", str(run)]
        output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return output.replace(str(Path(run) / "predictions_test.csv"), FIRST)
    with tempfile.TemporaryDirectory() as folder:  # the README's command, run where it would write runs/
        command = [sys.executable, str(ROOT / "train.py"), "--seg"]
        return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True).stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run", help="a finished run folder of `python train.py --seg` (skips training)")
    args = parser.parse_args()
    readme = table((ROOT / "README.md").read_text(), "README.md")
    printed = table(printed_table(args.run), "the command's output")
    if readme != printed:
        print("\n".join(difflib.unified_diff(readme, printed, "README.md", "printed", lineterm="")))
        sys.exit("README.md's example output differs from what the command prints (above)")
    print(f"README.md's example table matches the printed one ({len(readme)} lines)")


if __name__ == "__main__":
    main()
