"""The shape of the code a newcomer reads, measured the same way on any checkout (issue 26's before and after).

    python benchmarks/structure.py            # this checkout
    python benchmarks/structure.py /tmp/old   # a `git worktree` of another commit, with its own package folder

Prints, from the source alone (ast):
  the largest classes of train/ (lines, methods);
  the longest functions of the package;
  the places a step rule is written: an expression `x % <something>_every`;
  the places a store is opened: calls of Store(...), open_store(...) and read_manifest(...) outside their own
  modules (shards/ reads the manifest it writes);
and, from one `hdistill train` run with validation traced in this process (--trace), the modules and functions that
receive the command's options: a TrainConfig / TrainRuntime / OnlineConfig, or one of their non-trivial field values
(the same object), as an argument.
"""
from __future__ import annotations

import argparse
import ast
import collections
import sys
import tempfile
from pathlib import Path

SKIP = {".venv", "tests", "benchmarks", "build", ".git"}
OPENERS = {"Store", "open_store", "read_manifest"}
OPTION_TYPES = {"TrainConfig", "TrainRuntime", "OnlineConfig"}


def sources(root: Path):
    for path in sorted(root.rglob("*.py")):
        if not SKIP & set(path.relative_to(root).parts):
            yield path.relative_to(root), ast.parse(path.read_text())


def static(root: Path):
    classes, functions, rules, opens = [], [], [], []
    for rel, tree in sources(root):
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and rel.parts[0] == "train":
                methods = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)
                classes.append((node.end_lineno - node.lineno + 1, methods, f"{rel}:{node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
                right = node.right
                name = right.attr if isinstance(right, ast.Attribute) else getattr(right, "id", "")
                if name.endswith("_every"):
                    rules.append(f"{rel}:{node.lineno} ({name})")
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in OPENERS and rel.parts[0] != "shards":
                    opens.append(f"{rel}:{node.lineno} ({name})")
    classes.sort(reverse=True)
    functions.sort(reverse=True)
    print("largest classes of train/ (lines, methods):")
    for lines, methods, name in classes[:4]:
        print(f"  {lines:4d} {methods:3d}  {name}")
    print("longest functions:")
    for lines, name in functions[:3]:
        print(f"  {lines:4d}  {name}")
    print(f"step rules written ({len(rules)}): {', '.join(rules)}")
    print(f"stores opened ({len(opens)}): {', '.join(opens)}")


def traced(root: Path):
    """The functions that receive the train command's options over one small run (synthetic store, 2 steps)."""
    seen, values = collections.OrderedDict(), set()

    def profile(frame, event, arg):
        module = frame.f_globals.get("__name__") or ""
        if event != "call" or not module.startswith("hdistill") or module == "hdistill.common.options":
            return
        code = frame.f_code
        for name in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
            value = frame.f_locals.get(name)
            if type(value).__name__ in OPTION_TYPES:
                for field in value.__dataclass_fields__:
                    x = getattr(value, field, None)
                    if x is not None and not isinstance(x, (bool, int)) and not (isinstance(x, str) and len(x) < 8):
                        values.add(id(x))
            if name != "self" and (type(value).__name__ in OPTION_TYPES or id(value) in values):
                seen[(module, code.co_qualname)] = True
                return

    sys.path.insert(0, str(package_parent(root)))
    from hdistill.cli import cli
    tiny = [a for role in ("mae", "clip") for a in ("--model-arg", f"{role}.depth=3", "--model-arg",
                                                     f"{role}.embed_dim=24", "--model-arg", f"{role}.num_heads=2")]
    with tempfile.TemporaryDirectory() as tmp:
        cli.main(["precompute", "--data", "synthetic:8", "--out", f"{tmp}/s", "--teachers", "mae,clip", "--random-init",
                  "--image-size", "32", *tiny, "--batch-size", "4", "--shard-size", "4", "--workers", "0",
                  "--device", "cpu", "--quiet"], standalone_mode=False)
        sys.setprofile(profile)
        cli.main(["train", "--shards", f"{tmp}/s", "--val-shards", f"{tmp}/s", "--val-every", "2", "--out", f"{tmp}/r",
                  "--steps", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet",
                  "--student-arg", "depth=3", "--student-arg", "embed_dim=24", "--student-arg", "num_heads=2"],
                 standalone_mode=False)
        sys.setprofile(None)
    modules = list(dict.fromkeys(m for m, _ in seen))
    print(f"the train command's options reach {len(modules)} modules, {len(seen)} functions:")
    for module in modules:
        print(f"  {module}: {', '.join(f for m, f in seen if m == module)}")


def package_parent(root: Path) -> Path:
    """A folder whose `hdistill` is `root` (made beside it for a worktree of another commit)."""
    if root.name == "hdistill":
        return root.parent
    parent = Path(tempfile.mkdtemp(prefix="structure-"))
    (parent / "hdistill").symlink_to(root.resolve())
    return parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--trace", action="store_true", help="also trace one small train run (about 20 s)")
    args = ap.parse_args()
    root = Path(args.root)
    static(root)
    if args.trace:
        traced(root)


if __name__ == "__main__":
    main()
