"""Name the project's `pc-clip` kernel in every notebook's metadata (library, experiment and index notebooks).

Run from anywhere: `python tools/set_kernelspec.py` (add `--check` to only report the notebooks that do not
name it, exit status 1 if any). JupyterLab opens each notebook with this kernel, and papermill runs it with
it; `make install` registers the kernel (`python -m ipykernel install --name pc-clip`). The files are written
as nbdev_clean writes them, so `make test`'s sync check finds nothing to change.
"""
import argparse
import json
import sys
from pathlib import Path

# nbdev_clean sets display_name = name
KERNELSPEC = {"display_name": "pc-clip", "language": "python", "name": "pc-clip"}
REPO = Path(__file__).resolve().parent.parent


def notebooks(root: Path = REPO) -> list[Path]:
    "Every notebook under nbs/ (checkpoints left out)."
    return sorted(p for p in (root / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def set_kernelspec(path: Path, write: bool = True) -> bool:
    "Give `path` the pc-clip kernelspec; True if it did not have it."
    nb = json.loads(path.read_text(encoding="utf-8"))
    if nb.get("metadata", {}).get("kernelspec") == KERNELSPEC:
        return False
    if write:
        nb.setdefault("metadata", {})["kernelspec"] = dict(KERNELSPEC)
        path.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def user_kernel_owner(python: str = sys.executable) -> str | None:
    """A line naming the checkout whose venv the --user `pc-clip` kernel runs, when it is not `python`'s;
    else None."""
    from jupyter_core.paths import jupyter_data_dir
    spec = Path(jupyter_data_dir()) / "kernels" / "pc-clip" / "kernel.json"
    if not spec.exists():
        return None
    info = json.loads(spec.read_text(encoding="utf-8"))
    other = info.get("argv", [""])[0]
    if Path(other).resolve() == Path(python).resolve():
        return None
    return (f"note: your --user `pc-clip` kernel ran {other} ({info.get('display_name')}); make install now "
            f"points it at "
            f"this checkout ({Path(python).parent.parent.parent})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only list notebooks without the pc-clip kernel")
    ap.add_argument("--user-kernel-owner", action="store_true",
                    help="only say whether the --user pc-clip kernel belongs to another checkout's venv")
    args = ap.parse_args(argv)
    if args.user_kernel_owner:
        line = user_kernel_owner()
        if line:
            print(line)
        return 0
    changed = [p for p in notebooks() if set_kernelspec(p, write=not args.check)]
    for p in changed:
        print(f"{'lacks' if args.check else 'set'} pc-clip kernel: {p.relative_to(REPO)}")
    print(f"{len(changed)} of {len(notebooks())} notebooks {'lack' if args.check else 'changed'}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
